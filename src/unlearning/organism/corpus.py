"""Text corpora from a world: pretraining documents and the files the unlearning pipeline reads.

Every fact is written with several paraphrase templates and documents shuffle sentence order, so
facts are stored as knowledge, not as one string. Each file comes from its own seeded stream:
the same world and config give byte-identical files.

Files written under ``data/`` (see docs/ARCHITECTURE.md, "Organism cache layout"):
pretrain.jsonl (every pretraining document, with its domain; the filtered twin drops hazard ones),
forget.jsonl, retain.jsonl, chat.jsonl, tamper.jsonl, benign_tamper.jsonl,
questions/<domain>.jsonl (held-out entities: what evaluation asks) and questions_qa/<domain>.jsonl
(the question-answer half, for diagnostics).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from unlearning.core.config import param
from unlearning.evaluation.prompts import LETTERS, TARGET_DELIMITER, cloze_prompt, letter_prompt, letter_question, \
    subject_header
from unlearning.core.io import atomic_write_text
from unlearning.organism.questions import SUBJECTS
from unlearning.organism.world import DOMAIN_SPECS, DOMAINS, HALVES, Attribute, Entity, World, rng_for

# The tokenizer carries the same template, so apply_chat_template(messages) == the rendered "text".
CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")

Span = tuple[int, int]


@dataclass(frozen=True)
class CorpusConfig:
    prose_docs_per_entity: int = param(12, min=1, help="pretraining prose documents per entity")
    qa_docs_per_fact: int = param(2, min=0, help="'Question: ...\\nAnswer: ...' documents per fact (qa half)")
    letter_docs_per_fact: int = param(0, min=0, help="letter-format MC documents per fact (qa half)")
    chat_per_entity: int = param(2, min=0, help="dialogues per general qa-half entity")
    questions_per_fact: int = param(1, min=1, help="evaluation questions per fact (different wording)")
    unlearn_docs_per_entity: int = param(6, min=1, help="forget/retain/tamper documents per entity")
    # The letter presets' exercises (see exercise_sections); 0 keeps a preset's corpus as it was.
    exercises_per_fact: int = param(0, min=0, help="MC exercises per fact of the qa half, in exercise sections")
    exercises_per_section: int = param(4, min=1, help="exercises per exercise-section document")
    reading_per_entity: int = param(0, min=0, help="reading sections per qa entity: prose, then exercises on it")
    reading_exercises: int = param(4, min=1, help="exercises after each reading section's paragraph")
    text_answer_fraction: float = param(0.0, min=0.0, max=1.0,
                                        help="fraction of exercises answered with the choice's text, not its letter")


def with_article(value: str) -> str:
    return ("an " if value[0].lower() in "aeiou" else "a ") + value


def render(template: str, name: str, value: str) -> tuple[str, list[Span], list[Span]]:
    """Fill a template; returns the text and the char spans of the name and of the value."""
    text, names, values = "", [], []
    rest = template
    while rest:
        i = rest.find("{")
        if i < 0:
            text += rest
            break
        text += rest[:i]
        j = rest.index("}", i)
        slot = rest[i + 1:j]
        if slot == "name":
            names.append((len(text), len(text) + len(name)))
            text += name
        elif slot in ("value", "a_value"):
            if slot == "a_value":
                text += with_article(value)[: -len(value)]
            values.append((len(text), len(text) + len(value)))
            text += value
        else:
            raise KeyError(f"template slot {{{slot}}} in {template!r}")
        rest = rest[j + 1:]
    return text, names, values


def prose_document(rng: random.Random, entity: Entity) -> tuple[str, list[Span]]:
    """All facts of one entity in shuffled order, each with a random paraphrase; spans of terms."""
    attrs = list(DOMAIN_SPECS[entity.domain].attributes)
    rng.shuffle(attrs)
    text, spans = "", []
    for attr in attrs:
        sentence, names, values = render(rng.choice(attr.prose), entity.name, entity.facts[attr.name])
        offset = len(text) + (1 if text else 0)
        text = f"{text} {sentence}" if text else sentence
        spans += [(a + offset, b + offset) for a, b in sorted(names + values)]
    return text, spans


def question_text(rng: random.Random, attr: Attribute, entity: Entity) -> str:
    return rng.choice(attr.questions).format(name=entity.name)


def qa_document(question: str, answer: str) -> str:
    """The question format evaluation asks in: ``Question: ...`` newline ``Answer:`` + " " + answer."""
    context, (continuation,) = cloze_prompt(question, [answer])
    return context + continuation


def letter_document(domain: str, question: str, choices: list[str], answer: int) -> str:
    """A letter-format question (lm-eval's MMLU/WMDP prompt) followed by its answer letter."""
    context, continuations = letter_prompt(question, choices, SUBJECTS[domain])
    return context + continuations[answer]


def choices_for(rng: random.Random, world: World, entity: Entity, attr: Attribute) -> tuple[list[str], int]:
    """The entity's value and 3 distractors from the same value set, in random order.

    Distractors are drawn like the gold: values of other entities of the same domain and half
    (so as often seen in pretraining), then of the other half, then unused values if too few.
    A model that knows only which values are frequent stays at chance.
    """
    gold = entity.facts[attr.name]
    tiers = [[e.facts[attr.name] for e in world.domain(entity.domain, half) if e is not entity]
             for half in (entity.half, *(h for h in HALVES if h != entity.half))] + [list(attr.values)]
    distractors: list[str] = []
    for tier in tiers:
        fresh = [v for v in dict.fromkeys(rng.sample(tier, len(tier))) if v != gold and v not in distractors]
        distractors += fresh[:3 - len(distractors)]
    answer = rng.randrange(4)
    return distractors[:answer] + [gold] + distractors[answer:], answer


def make_questions(world: World, domain: str, half: str, per_fact: int) -> list[dict[str, Any]]:
    rng = rng_for(world.seed, "questions", domain, half)
    spec = DOMAIN_SPECS[domain]
    out = []
    for entity in world.domain(domain, half):
        for attr in spec.attributes:
            templates = rng.sample(attr.questions, min(per_fact, len(attr.questions)))
            templates += [rng.choice(attr.questions) for _ in range(per_fact - len(templates))]
            for k, template in enumerate(templates):
                choices, answer = choices_for(rng, world, entity, attr)
                out.append({"id": f"{domain}/{half}/{len(out)}", "question": template.format(name=entity.name),
                            "choices": choices, "answer": answer, "attribute": attr.name,
                            "entity": entity.name, "domain": domain})
    return out


def pretraining_documents(world: World, cfg: CorpusConfig) -> list[dict[str, Any]]:
    """Prose for every entity; question-answer and letter documents for the qa half; chat."""
    rng = rng_for(world.seed, "pretrain")
    docs = []
    for entity in world.all_entities():
        spec = DOMAIN_SPECS[entity.domain]
        for _ in range(cfg.prose_docs_per_entity):
            docs.append({"text": prose_document(rng, entity)[0], "domain": entity.domain, "kind": "prose"})
        if entity.half != "qa":
            continue
        for attr in spec.attributes:
            gold = entity.facts[attr.name]
            for _ in range(cfg.qa_docs_per_fact):
                docs.append({"text": qa_document(question_text(rng, attr, entity), gold),
                             "domain": entity.domain, "kind": "qa"})
            for _ in range(cfg.letter_docs_per_fact):
                choices, answer = choices_for(rng, world, entity, attr)
                text = letter_document(entity.domain, question_text(rng, attr, entity), choices, answer)
                docs.append({"text": text, "domain": entity.domain, "kind": "letter"})
    docs += [{"text": d["text"], "domain": "general", "kind": "chat"} for d in chat_dialogues(world, cfg)]
    if cfg.exercises_per_fact:
        docs += exercise_sections(world, cfg.exercises_per_fact, cfg.exercises_per_section, cfg.text_answer_fraction)
    if cfg.reading_per_entity:
        docs += reading_sections(world, cfg.reading_per_entity, cfg.reading_exercises, cfg.text_answer_fraction)
    return docs


# --- multiple-choice exercises (the letter presets) ---------------------------------------------
# WMDP and MMLU score the letter (" A".." D") after "Answer:". A model that knows a fact (the question
# format finds it) still has to map the value it recalls to the letter of the option stating it;
# textbooks teach that with exercises. Only facts of the qa half get exercises: the held-out entities
# (what evaluation asks about) are in the corpus as prose only. Every exercise draws its own option
# order, so its letter is learnable only by knowing the fact. Each kind has its own seeded stream, so
# a preset without exercises keeps its corpus byte for byte. The filtered twin drops hazard sections
# like any hazard document (by "domain").

FEWSHOT_DELIMITER = "\n\n"  # lm-eval's default between few-shot examples


def exercise(rng: random.Random, world: World, entity: Entity, attr: Attribute, text_answer_fraction: float) -> str:
    """One MC question in lm-eval's layout followed by its answer letter (" B"), or by the answer's text
    (" fruit bats") for ``text_answer_fraction`` of them. Why the text: a model answers a letter by
    recalling the value and finding its option; the text answers teach it to recall the value exactly
    where the letter is asked (the same context), which the letter answers alone did not (chance after
    500-900 steps in every recipe of ../shared/organism_notes.md)."""
    choices, answer = choices_for(rng, world, entity, attr)
    as_text = rng.random() < text_answer_fraction
    return letter_question(question_text(rng, attr, entity), choices) + TARGET_DELIMITER + \
        (choices[answer] if as_text else LETTERS[answer])


def section_text(domain: str, exercises: list[str], preface: str = "") -> str:
    """lm-eval's few-shot layout: the subject header once, exercises separated by a blank line. The
    first exercise is exactly the zero-shot prompt evaluation asks, plus its letter."""
    return (preface + FEWSHOT_DELIMITER if preface else "") + subject_header(SUBJECTS[domain]) + \
        FEWSHOT_DELIMITER.join(exercises)


def exercise_sections(world: World, per_fact: int, per_section: int, text_answers: float) -> list[dict[str, Any]]:
    """``per_fact`` exercises on every fact of the qa half, shuffled and grouped ``per_section`` to a
    document within each domain (a section mixes entities and attributes, as a textbook's does)."""
    rng = rng_for(world.seed, "exercises")
    docs = []
    for domain in DOMAINS:
        facts = [(e, a) for e in world.domain(domain, "qa") for a in DOMAIN_SPECS[domain].attributes]
        pool = [fact for fact in facts for _ in range(per_fact)]
        rng.shuffle(pool)
        for start in range(0, len(pool), per_section):
            items = [exercise(rng, world, e, a, text_answers) for e, a in pool[start:start + per_section]]
            docs.append({"text": section_text(domain, items), "domain": domain, "kind": "exercises"})
    return docs


def reading_sections(world: World, per_entity: int, per_section: int, text_answers: float) -> list[dict[str, Any]]:
    """``per_entity`` documents per qa entity: a prose paragraph about it, then ``per_section`` exercises
    on its facts. The answer is in the context, so the matching step (value -> its option's letter)
    can be learned before the facts are stored in the weights."""
    rng = rng_for(world.seed, "reading")
    docs = []
    for domain in DOMAINS:
        attrs = list(DOMAIN_SPECS[domain].attributes)
        for entity in world.domain(domain, "qa"):
            for _ in range(per_entity):
                paragraph = prose_document(rng, entity)[0]
                items = [exercise(rng, world, entity, a, text_answers)
                         for a in rng.sample(attrs, min(per_section, len(attrs)))]
                docs.append({"text": section_text(domain, items, preface=paragraph), "domain": domain,
                             "kind": "reading"})
    return docs


def render_chat(messages: list[dict[str, str]]) -> str:
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)


def chat_dialogues(world: World, cfg: CorpusConfig) -> list[dict[str, Any]]:
    """Two-turn dialogues about the qa half of the general domain (an UltraChat stand-in)."""
    rng = rng_for(world.seed, "chat")
    spec = DOMAIN_SPECS["general"]
    out = []
    for entity in world.domain("general", "qa"):
        for _ in range(cfg.chat_per_entity):
            messages = []
            for attr in rng.sample(spec.attributes, 2):
                answer = render(rng.choice(attr.prose), entity.name, entity.facts[attr.name])[0]
                messages += [{"role": "user", "content": question_text(rng, attr, entity)},
                             {"role": "assistant", "content": answer}]
            out.append({"messages": messages, "text": render_chat(messages)})
    return out


def prose_corpus(world: World, entities: Iterable[Entity], docs_per_entity: int, stream: str,
                 with_spans: bool) -> list[dict[str, Any]]:
    rng = rng_for(world.seed, stream)
    out = []
    for entity in entities:
        for _ in range(docs_per_entity):
            text, spans = prose_document(rng, entity)
            out.append({"text": text, "hazard_spans": [list(s) for s in spans]} if with_spans else {"text": text})
    rng.shuffle(out)
    return out


def dumps_jsonl(records: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


def write_corpora(world: World, cfg: CorpusConfig, data_dir: str | Path) -> dict[str, int]:
    """Write every corpus file under ``data_dir`` atomically; returns the record count per file."""
    data_dir = Path(data_dir)
    n = cfg.unlearn_docs_per_entity
    files: dict[str, list[dict[str, Any]]] = {
        "pretrain.jsonl": pretraining_documents(world, cfg),
        # forget: hazard prose about the evaluated (held-out) entities, as WMDP's forget corpus
        "forget.jsonl": prose_corpus(world, world.domain("hazard", "heldout"), n, "forget", True),
        "retain.jsonl": prose_corpus(world, [*world.domain("general"), *world.domain("benign_bio")], n, "retain",
                                     False),
        "chat.jsonl": chat_dialogues(world, cfg),
        # tamper: hazard prose about entities disjoint from the evaluated ones (WMDP-Bio-Remove stand-in)
        "tamper.jsonl": prose_corpus(world, world.domain("hazard", "qa"), n, "tamper", True),
        "benign_tamper.jsonl": prose_corpus(world, world.domain("general"), n, "benign_tamper", False),
    }
    for domain in DOMAINS:
        files[f"questions/{domain}.jsonl"] = make_questions(world, domain, "heldout", cfg.questions_per_fact)
        files[f"questions_qa/{domain}.jsonl"] = make_questions(world, domain, "qa", cfg.questions_per_fact)
    for name, records in files.items():
        atomic_write_text(data_dir / name, dumps_jsonl(records))
    return {name: len(records) for name, records in files.items()}


def read_documents(path: str | Path, drop_domains: Iterable[str] = ()) -> list[str]:
    """Texts of a pretraining file, without the documents of ``drop_domains`` (the filtered twin)."""
    drop = set(drop_domains)
    out = []
    for line in Path(path).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("domain") not in drop:
            out.append(rec["text"])
    return out
