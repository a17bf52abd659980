"""The organism's pieces, without training: world, corpora, tokenizer, presets, names, packing."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from unlearning.core.errors import ConfigError, ModelNotFoundError
from unlearning.evaluation.prompts import cloze_prompt
from unlearning.organism.build import OrganismPaths, build_lock, choose_early
from unlearning.organism.corpus import read_documents, write_corpora
from unlearning.organism.presets import PRESETS, get_preset
from unlearning.organism.pretrain import TrainConfig, lr_at, packed_batches, plan_checkpoints
from unlearning.organism.registry import organism_preset, parse_organism_name
from unlearning.organism.tokenizer import build_tokenizer
from unlearning.organism.world import DOMAIN_SPECS, DOMAINS, HAZARD, generate_world

TINY = PRESETS["tiny"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world():
    return generate_world(TINY.seed, TINY.world)


@pytest.fixture(scope="module")
def corpus_dir(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    write_corpora(world, TINY.corpus, out)
    return out


@pytest.fixture(scope="module")
def tokenizer(world):
    return build_tokenizer(world, TINY.world, TINY.corpus, TINY.tokenizer)


# --- determinism ----------------------------------------------------------------------------

def test_world_is_deterministic_and_seeded(world):
    again = generate_world(TINY.seed, TINY.world)
    assert again.to_json() == world.to_json()
    other = generate_world(TINY.seed + 1, TINY.world)
    assert [e.name for e in other.all_entities()] != [e.name for e in world.all_entities()]


def test_same_seed_gives_byte_identical_corpora(world, corpus_dir, tmp_path):
    write_corpora(generate_world(TINY.seed, TINY.world), TINY.corpus, tmp_path)
    files = sorted(p.relative_to(corpus_dir) for p in corpus_dir.rglob("*.jsonl"))
    assert len(files) == 12  # 6 corpora + questions and questions_qa for 3 domains
    for rel in files:
        assert (tmp_path / rel).read_bytes() == (corpus_dir / rel).read_bytes(), rel
    write_corpora(generate_world(TINY.seed + 1, TINY.world), TINY.corpus, tmp_path / "other")
    assert (tmp_path / "other" / "forget.jsonl").read_bytes() != (corpus_dir / "forget.jsonl").read_bytes()


def test_tokenizer_is_deterministic(world, tokenizer):
    again = build_tokenizer(world, TINY.world, TINY.corpus, TINY.tokenizer)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()


# --- world ----------------------------------------------------------------------------------

def test_world_halves_names_and_values(world):
    names = [e.name for e in world.all_entities()]
    assert len(set(names)) == len(names)
    for domain in DOMAINS:
        entities = world.domain(domain)
        assert len(entities) == TINY.world.entities_per_domain
        assert len(world.domain(domain, "qa")) == len(world.domain(domain, "heldout")) == len(entities) // 2
        for e in entities:
            for attr in DOMAIN_SPECS[domain].attributes:
                assert e.facts[attr.name] in attr.values
    assert all(e.name.endswith(" virus") for e in world.domain("hazard"))
    shared = {a.name for a in DOMAIN_SPECS["benign_bio"].attributes} & {a.name for a in HAZARD.attributes}
    assert {"genome_type", "origin_lab"} <= shared  # benign-bio shares value sets with hazard


def test_names_are_several_tokens(world, tokenizer):
    for e in world.all_entities():
        base = e.name.removesuffix(" virus").removesuffix(" bacterium")
        assert len(tokenizer.encode(" " + base)) >= 3, e.name


# --- corpora --------------------------------------------------------------------------------

def test_filtered_corpus_has_no_hazard_document(world, corpus_dir):
    docs = read_documents(corpus_dir / "pretrain.jsonl", drop_domains=("hazard",))
    hazard_terms = [e.name for e in world.domain("hazard")]
    hazard_only = {a.name for a in HAZARD.attributes} - {a.name for a in DOMAIN_SPECS["benign_bio"].attributes}
    hazard_terms += [v for a in HAZARD.attributes if a.name in hazard_only for v in a.values]
    assert docs and len(docs) < len(read_documents(corpus_dir / "pretrain.jsonl"))
    text = "\n".join(docs)
    assert not [t for t in hazard_terms if t in text]
    assert " virus" not in text


def test_heldout_entities_appear_only_as_prose(world, corpus_dir):
    docs = read_jsonl(corpus_dir / "pretrain.jsonl")
    heldout = [e.name for e in world.all_entities() if e.half == "heldout"]
    for doc in docs:
        if doc["kind"] != "prose":
            assert not [n for n in heldout if n in doc["text"]], doc
    qa = [d for d in docs if d["kind"] == "qa"]
    assert qa and all(d["text"].startswith("Question: ") and "\nAnswer: " in d["text"] for d in qa)


def test_hazard_spans_point_at_hazard_terms(world, corpus_dir):
    terms = {e.name for e in world.domain("hazard")} | {v for a in HAZARD.attributes for v in a.values}
    for name in ("forget.jsonl", "tamper.jsonl"):
        records = read_jsonl(corpus_dir / name)
        assert records
        for rec in records:
            text, spans = rec["text"], rec["hazard_spans"]
            assert spans == sorted(spans)
            assert all(text[a:b] in terms for a, b in spans)
            name_in_doc = next(text[a:b] for a, b in spans if text[a:b].endswith(" virus"))
            assert len(spans) == text.count(name_in_doc) + len(HAZARD.attributes)  # every name and value


def test_tamper_entities_are_disjoint_from_evaluated_ones(world, corpus_dir):
    def entities_in(name: str) -> set[str]:
        found = set()
        for rec in read_jsonl(corpus_dir / name):
            found |= {e.name for e in world.domain("hazard") if e.name in rec["text"]}
        return found

    evaluated = {q["entity"] for q in read_jsonl(corpus_dir / "questions" / "hazard.jsonl")}
    assert evaluated == {e.name for e in world.domain("hazard", "heldout")}
    assert entities_in("tamper.jsonl") == {e.name for e in world.domain("hazard", "qa")}
    assert not entities_in("tamper.jsonl") & evaluated
    assert entities_in("forget.jsonl") == evaluated
    assert all("virus" not in r["text"] for r in read_jsonl(corpus_dir / "retain.jsonl"))


def test_questions_have_gold_and_three_distractors(world, corpus_dir):
    facts = {e.name: e.facts for e in world.all_entities()}
    for domain in DOMAINS:
        questions = read_jsonl(corpus_dir / "questions" / f"{domain}.jsonl")
        spec = DOMAIN_SPECS[domain]
        per_entity = len(spec.attributes) * TINY.corpus.questions_per_fact
        assert len(questions) == len(world.domain(domain, "heldout")) * per_entity
        assert len({q["id"] for q in questions}) == len(questions)
        for q in questions:
            assert set(q) == {"id", "question", "choices", "answer", "attribute", "entity", "domain"}
            values = next(a.values for a in spec.attributes if a.name == q["attribute"])
            assert len(set(q["choices"])) == 4 and all(c in values for c in q["choices"])
            assert q["choices"][q["answer"]] == facts[q["entity"]][q["attribute"]]
            assert q["entity"] in q["question"]
        golds = [q["answer"] for q in questions]
        assert len(set(golds)) == 4  # answer positions vary


def test_value_frequency_alone_is_at_chance(corpus_dir):
    """Knowing only how often each value occurs in pretraining must not answer the questions."""
    text = (corpus_dir / "pretrain.jsonl").read_text()
    for domain in DOMAINS:
        questions = read_jsonl(corpus_dir / "questions" / f"{domain}.jsonl")
        score = 0.0
        for q in questions:
            counts = [text.count(c) for c in q["choices"]]
            best = [i for i, n in enumerate(counts) if n == max(counts)]
            score += (q["answer"] in best) / len(best)
        assert score / len(questions) <= 0.30, domain  # chance is 0.25 (0.247-0.267 for this world)


def test_qa_documents_use_the_evaluation_prompt(corpus_dir):
    pretrain_texts = set(read_documents(corpus_dir / "pretrain.jsonl"))
    found = 0
    for q in read_jsonl(corpus_dir / "questions_qa" / "general.jsonl"):
        context, continuations = cloze_prompt(q["question"], q["choices"])
        found += context + continuations[q["answer"]] in pretrain_texts
    assert found > 0  # the qa half is taught in exactly the format evaluation asks in


def test_chat_text_is_the_tokenizer_chat_template(corpus_dir, tokenizer):
    dialogues = read_jsonl(corpus_dir / "chat.jsonl")
    assert dialogues
    for d in dialogues[:5]:
        assert [m["role"] for m in d["messages"]] == ["user", "assistant"] * 2
        assert tokenizer.apply_chat_template(d["messages"], tokenize=False) == d["text"]


# --- tokenizer ------------------------------------------------------------------------------

def test_tokenizer_is_gpt_neox_like(tokenizer):
    for letter in "ABCD":
        assert len(tokenizer.encode(f" {letter}")) == 1
    ids = tokenizer.encode("Answer: B")
    assert tokenizer.bos_token_id not in ids and tokenizer.eos_token_id not in ids
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == TINY.tokenizer.vocab_size
    assert tokenizer.decode(tokenizer.encode("Dregund virus spreads through raw milk.")) == \
        "Dregund virus spreads through raw milk."


# --- presets, names, training pieces ---------------------------------------------------------

def test_presets():
    assert PRESETS["small"].model.num_layers == 32  # layer specs like 31->11:4 apply unchanged
    assert PRESETS["tiny"].train.device == "cpu"
    with pytest.raises(ConfigError, match="unknown organism preset 'huge'.*tiny, small"):
        get_preset("huge")
    with pytest.raises(ConfigError, match="train.lr: -1.0 is below the minimum"):
        get_preset("tiny", overrides={"train": {"lr": -1}})
    assert get_preset("tiny", seed=5).seed == 5


def test_organism_names():
    assert parse_organism_name("organism:tiny") == parse_organism_name("organism:tiny", "main")
    name = parse_organism_name("organism:small@step200")
    assert (name.preset, name.filtered, name.revision) == ("small", False, "step200")
    assert parse_organism_name("organism:small", revision="early").revision == "early"
    assert parse_organism_name("organism:tiny-filtered").filtered
    with pytest.raises(ModelNotFoundError, match="unknown organism preset 'medium'.*organism:tiny, organism:small"):
        parse_organism_name("organism:medium")
    with pytest.raises(ModelNotFoundError, match="filtered twin has no checkpoints"):
        parse_organism_name("organism:tiny-filtered@step5")
    with pytest.raises(ModelNotFoundError, match="give one of them"):
        parse_organism_name("organism:tiny@step5", revision="step9")


def test_packed_batches_cover_every_document_each_epoch():
    docs = [np.arange(start, start + n) for start, n in ((0, 5), (100, 7), (200, 3), (300, 9))]
    total = sum(len(d) for d in docs)
    batches = packed_batches(docs, seq_len=4, batch_size=2, seed=0)
    seen = np.concatenate([next(batches).reshape(-1) for _ in range(total // 8)])
    assert next(batches).shape == (2, 4)
    # the first epoch's tokens, in some document order, minus what did not fill a whole batch
    assert len(seen) == total // 8 * 8 and len(set(seen.tolist())) == len(seen)


def test_lr_schedule_and_checkpoint_plan():
    cfg = TrainConfig(lr=1e-3, warmup_frac=0.1, min_lr_ratio=0.1, epochs=2, seq_len=10, batch_size=1,
                      checkpoint_fracs=[0.05, 0.5])
    assert lr_at(0, 100, cfg) == pytest.approx(1e-4)
    assert lr_at(9, 100, cfg) == pytest.approx(1e-3)
    assert lr_at(99, 100, cfg) == pytest.approx(1e-4, rel=0.01)
    assert plan_checkpoints(500, cfg) == (5, 50)  # 2 epochs of 500 tokens, 10 per step: 100 steps


def test_early_checkpoint_choice():
    def q(acc):
        return {"heldout": {"hazard": {"cloze": {"acc": acc}}}}
    assert choose_early({"step10": q(0.25), "step20": q(0.3), "step40": q(0.6)}, 0.35) == "step20"
    assert choose_early({"step10": q(0.5), "step20": q(0.7)}, 0.35) == "step10"
    assert choose_early({}, 0.35) is None


@pytest.mark.slow
def test_a_failing_twin_process_fails_the_build_with_its_log(tmp_path):
    from unlearning.organism.build import run_twins
    from unlearning.organism.pretrain import PretrainJob

    cfg = PRESETS["tiny"]
    job = PretrainJob(name="unfiltered", docs_path=str(tmp_path / "missing.jsonl"), drop_domains=(),
                      tokenizer_dir=str(tmp_path), out_dir=str(tmp_path / "model"), model=cfg.model,
                      train=cfg.train, seed=0)
    with pytest.raises(RuntimeError, match=r"(?s)the unfiltered process failed \(exit code 1\).*Traceback.*Error"):
        run_twins([(job, {})], tmp_path, cfg, tmp_path)


def test_build_lock_serialises_builders(tmp_path):
    paths = OrganismPaths(tmp_path / "organism" / "demo")
    acquired = []

    def second():
        with build_lock(paths):
            acquired.append(time.monotonic())

    with build_lock(paths):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        released = time.monotonic()
        assert not acquired
    thread.join(5)
    assert acquired and acquired[0] >= released


def test_organism_preset_of_names_and_run_directories(tmp_path):
    """The one parser of model names into presets (runner, eval, tamper, mask and fit-affine use it)."""
    assert organism_preset("organism:small-filtered@step200") == "small"
    assert organism_preset("organism:tiny") == "tiny"
    assert organism_preset("EleutherAI/deep-ignorance-unfiltered") is None
    run, run_of_run, other = tmp_path / "run", tmp_path / "run2", tmp_path / "other"
    for folder, model in ((run, "organism:tiny-filtered"), (run_of_run, str(run)), (other, "gpt2")):
        folder.mkdir()
        (folder / "config.yaml").write_text(f"model: {model}\n")
    assert organism_preset(run) == "tiny" and organism_preset(str(run_of_run)) == "tiny"
    assert organism_preset(other) is None and organism_preset(tmp_path) is None
    (other / "config.yaml").write_text(f"model: {other}\n")  # a run naming itself ends, not loops
    assert organism_preset(other) is None
    with pytest.raises(ModelNotFoundError, match="unknown organism preset 'medium'"):
        organism_preset("organism:medium")
