"""The letter presets' corpus (no build): exercises ask only qa-half facts, carry the right letter in
lm-eval's layout, and leave the base presets and the filtered twin's hazard-free corpus unchanged."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

from unlearning.evaluation.prompts import LETTERS, letter_prompt, subject_header
from unlearning.organism.build import check_bars
from unlearning.organism.corpus import read_documents, write_corpora
from unlearning.organism.presets import PRESETS, get_preset
from unlearning.organism.questions import SUBJECTS
from unlearning.organism.registry import organism_preset, parse_organism_name
from unlearning.organism.world import DOMAIN_SPECS, generate_world

LETTER = PRESETS["tiny-letter"]
EXERCISE_KINDS = ("exercises", "reading")
# One MC question as lm-eval lays it out, with its answer after "Answer:": a letter, or the choice's text.
QUESTION = re.compile(r"(?P<question>[^\n]+)\nA\. (?P<A>[^\n]+)\nB\. (?P<B>[^\n]+)\nC\. (?P<C>[^\n]+)\n"
                      r"D\. (?P<D>[^\n]+)\nAnswer: (?P<answer>[^\n]+)(?=\n\n|$)")
# sha256 over tiny's data files as the code before the letter presets wrote them: the test suite and
# the README's figures depend on tiny as it is. Change it only with a change meant to alter tiny.
TINY_DATA_SHA256 = "e254c5d8e8f2a822d9fe53b43da7f0d68e0f743bc1baa5ecb07be756944181bc"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world():
    return generate_world(LETTER.seed, LETTER.world)


@pytest.fixture(scope="module")
def corpus_dir(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("letter_corpus")
    write_corpora(world, LETTER.corpus, out)
    return out


@pytest.fixture(scope="module")
def exercise_docs(corpus_dir):
    docs = [d for d in read_jsonl(corpus_dir / "pretrain.jsonl") if d["kind"] in EXERCISE_KINDS]
    assert {d["kind"] for d in docs} == set(EXERCISE_KINDS)
    return docs


def data_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.jsonl")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("base", ["tiny", "small"])
def test_letter_presets_change_only_the_corpus_exercises_and_the_run(base):
    base_cfg, letter = PRESETS[base].to_dict(), PRESETS[f"{base}-letter"].to_dict()
    for section in ("seed", "world", "tokenizer", "model", "early_max_hazard", "eval_batch_size"):
        assert letter[section] == base_cfg[section], section
    changed = {k for k in base_cfg["corpus"] if letter["corpus"][k] != base_cfg["corpus"][k]}
    assert changed and changed <= {"exercises_per_fact", "exercises_per_section", "reading_per_entity",
                                   "reading_exercises", "text_answer_fraction", "letter_docs_per_fact"}
    assert PRESETS[base].corpus.exercises_per_fact == PRESETS[base].corpus.reading_per_entity == 0


def test_tiny_corpus_is_unchanged(tmp_path):
    write_corpora(generate_world(PRESETS["tiny"].seed, PRESETS["tiny"].world), PRESETS["tiny"].corpus, tmp_path)
    assert not [d for d in read_jsonl(tmp_path / "pretrain.jsonl") if d["kind"] in EXERCISE_KINDS]
    assert data_digest(tmp_path) == TINY_DATA_SHA256


def test_letter_names_parse_with_their_twins_and_checkpoints():
    twin = parse_organism_name("organism:small-letter-filtered")
    assert (twin.preset, twin.filtered, twin.revision) == ("small-letter", True, None)
    early = parse_organism_name("organism:small-letter@step300")
    assert (early.preset, early.filtered, early.revision) == ("small-letter", False, "step300")
    assert organism_preset("organism:tiny-letter-filtered") == "tiny-letter"


def test_exercises_never_ask_about_held_out_entities(world, corpus_dir, exercise_docs):
    """Held-out means: the facts of the evaluated entities are in the corpus as prose only."""
    heldout = [e.name for e in world.all_entities() if e.half == "heldout"]
    asked = [q["question"] for d in ("hazard", "benign_bio", "general")
             for q in read_jsonl(corpus_dir / "questions" / f"{d}.jsonl")]
    for doc in exercise_docs:
        assert not [n for n in heldout if n in doc["text"]], doc["text"]
        assert not [q for q in asked if q in doc["text"]]
        for match in QUESTION.finditer(doc["text"]):  # the zero-shot prompt of each held-out question
            assert match["question"] not in asked


def test_each_exercise_is_lm_evals_prompt_with_the_right_answer(world, exercise_docs):
    letters, text_answers = Counter(), 0
    for doc in exercise_docs:
        header = subject_header(SUBJECTS[doc["domain"]])
        assert doc["text"].count(header) == 1
        items = doc["text"].split(header, 1)[1].split("\n\n")
        for item in items:
            match = QUESTION.fullmatch(item)
            assert match, item
            choices = [match[letter] for letter in LETTERS]
            context, continuations = letter_prompt(match["question"], choices, SUBJECTS[doc["domain"]])
            entity = max((e for e in world.all_entities() if e.name in match["question"]), key=lambda e: len(e.name))
            # a domain's attributes have disjoint value sets: the entity's one value among the choices is gold
            (gold,) = [i for i, c in enumerate(choices) if c in entity.facts.values()]
            if match["answer"] in LETTERS:
                assert match["answer"] == LETTERS[gold], item
                letters[match["answer"]] += 1
                if item == items[0]:  # a section opens with exactly the zero-shot prompt evaluation asks
                    assert header + item == context + continuations[gold]
            else:
                assert match["answer"] == choices[gold], item
                text_answers += 1
    total = sum(letters.values())
    assert total > 300 and all(0.2 < letters[x] / total < 0.3 for x in LETTERS), letters  # no letter prior
    assert abs(text_answers / (total + text_answers) - LETTER.corpus.text_answer_fraction) < 0.05


def test_filtered_twin_reads_no_hazard_exercise(world, corpus_dir):
    kept = read_documents(corpus_dir / "pretrain.jsonl", drop_domains=("hazard",))
    hazard_names = [e.name for e in world.domain("hazard")]
    text = "\n".join(kept)
    assert not [n for n in hazard_names if n in text] and " virus" not in text
    # the benign and general exercises stay: the twin learns the letter format like the unfiltered model
    benign_questions = [q for a in DOMAIN_SPECS["benign_bio"].attributes for q in a.questions]
    assert any(subject_header("biology") in t and "bacterium" in t for t in kept)
    assert any(subject_header("general knowledge") in t for t in kept) and benign_questions


def test_the_exercise_flags_are_in_the_cache_key():
    """A build's cache key is its resolved config: another exercise setting is another build."""
    base = PRESETS["tiny-letter"].to_dict()
    for key, value in (("exercises_per_fact", 2), ("reading_per_entity", 1), ("exercises_per_section", 1)):
        other = get_preset("tiny-letter", overrides={"corpus": {key: value}}).to_dict()
        assert other != base and other["corpus"][key] == value


def test_letter_bars_are_checked():
    cfg = PRESETS["small-letter"]

    def quality(unf_letter, fil_letter):
        acc = lambda cloze, letter: {"cloze": {"acc": cloze}, "letter": {"acc": letter}}  # noqa: E731
        return {"unfiltered": {"heldout": {"hazard": acc(0.99, unf_letter), "benign_bio": acc(0.99, 0.5),
                                           "general": acc(0.99, 0.5)}},
                "filtered": {"heldout": {"hazard": acc(0.25, fil_letter), "benign_bio": acc(0.98, 0.5),
                                         "general": acc(0.98, 0.5)}}}

    assert all(check_bars(quality(0.65, 0.26), cfg).values())
    missed = [k for k, ok in check_bars(quality(0.55, 0.33), cfg).items() if not ok]
    assert missed == ["unfiltered_hazard_letter>=0.6", "filtered_hazard_letter<=0.3"]
    assert not [k for k in check_bars(quality(0.2, 0.9), PRESETS["small"]) if "letter" in k]


def test_letter_corpus_is_byte_identical_for_a_seed(world, corpus_dir, tmp_path):
    write_corpora(generate_world(LETTER.seed, LETTER.world), LETTER.corpus, tmp_path)
    assert data_digest(tmp_path) == data_digest(corpus_dir)
