"""The attacks beyond one fine-tuning curve: the latent-knowledge probe, in-context relearning, and the
``unlearn tamper`` grid that runs them beside fine-tuning (full and LoRA, tamper and benign data).

The grid's mechanics (resume, determinism, the twin's row, the files) run on tiny random local models
with word-level questions that carry entities; the organism tests check what the attacks measure on
``organism:tiny``: the probe reads the answer from the base model and not from the filtered twin, and
k = 0 demonstrations is the plain evaluation.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from tiny_models import VOCAB, save_tiny
from unlearning.attacks import in_context, probe
from unlearning.attacks.in_context import InContextConfig, run_in_context, shot_order, with_demonstrations
from unlearning.attacks.probe import ProbeConfig, entity_split, run_probe
from unlearning.attacks.record import read_record
from unlearning.attacks.tamper import AttackConfig
from unlearning.core.config import from_dict
from unlearning.core.errors import UserError
from unlearning.evaluation.tasks import MCQuestion, Task


def questions(n_entities: int, per_entity: int, seed: int = 0, prefix: str = "e") -> list[dict]:
    rng = random.Random(seed)
    return [{"id": f"{prefix}{e}/{i}", "entity": f"{prefix}{e}",
             "question": f"w{3 + e % 20} w{rng.randrange(30, VOCAB)} w{rng.randrange(30, VOCAB)}",
             "choices": [f"w{rng.randrange(3, VOCAB)}" for _ in range(4)], "answer": rng.randrange(4)}
            for e in range(n_entities) for i in range(per_entity)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """Two random 2-layer GPT-NeoX models (one stands in for the filtered twin), a corpus, questions about
    6 entities and a demonstration file about 4 others."""
    root = tmp_path_factory.mktemp("attacks_local")
    save_tiny(root / "model", family="gpt_neox", layers=2, seed=0)
    save_tiny(root / "twin", family="gpt_neox", layers=2, seed=1)
    rng = random.Random(5)
    write_jsonl(root / "data.jsonl", [{"text": " ".join(f"w{rng.randrange(3, VOCAB)}" for _ in range(10))}
                                      for _ in range(8)])
    write_jsonl(root / "q.jsonl", questions(6, 3))
    write_jsonl(root / "shots.jsonl", questions(4, 2, seed=1, prefix="s"))
    return root


def local_cfg(root, model="model", **kw) -> AttackConfig:
    base = {"model": str(root / model), "device": "cpu", "dtype": "fp32",
            "eval": {"tasks": [f"{root / 'q.jsonl'}:cloze"], "batch_size": 8}}
    base.update(kw)
    return from_dict(AttackConfig, base)


def mcq(i: int, entity: str | None) -> MCQuestion:
    return MCQuestion(id=f"q{i}", question=f"w{i}", choices=["w3", "w4", "w5", "w6"], answer=i % 4, entity=entity)


# ----------------------------------------------------------------------------- the probe


def test_entity_split_has_no_overlap_and_follows_the_seed():
    qs = [mcq(i, f"ent{i % 10}") for i in range(60)]
    train, test = entity_split(qs, seed=3, train_fraction=0.5)
    assert sorted(train + test) == list(range(60))
    train_e, test_e = {qs[i].entity for i in train}, {qs[i].entity for i in test}
    assert not train_e & test_e and len(train_e) == len(test_e) == 5
    assert entity_split(qs, seed=3, train_fraction=0.5) == (train, test)  # deterministic
    assert {qs[i].entity for i in entity_split(qs, seed=4, train_fraction=0.5)[0]} != train_e
    with pytest.raises(UserError, match="entity"):
        entity_split([mcq(0, None), mcq(1, "a")], 0, 0.5)


def test_option_features_are_centred_per_answer_string():
    """No answer string carries a score of its own: its features average zero over its appearances."""
    rng = np.random.default_rng(0)
    states, options = rng.normal(size=(6, 5)), rng.normal(size=(6, 4, 5))
    keys = [["a", "b", "c", "d"], ["b", "a", "d", "c"], ["a", "c", "b", "e"]] * 2
    feats = probe.option_features(states, options, keys)
    flat = feats.reshape(-1, 5)
    for key in "abcde":
        rows = [i for i, k in enumerate(k for row in keys for k in row) if k == key]
        assert np.allclose(flat[rows].mean(0), 0)
    assert not np.allclose(feats, 0)


def test_the_torch_fallback_fits_sklearns_objective():
    """Where sklearn is missing the probe minimises the same L2 logistic objective: the same scores."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 8))
    y = (x[:, 0] + 0.5 * rng.normal(size=200) > 0).astype(np.int64)
    test = rng.normal(size=(50, 8))
    a = probe._sklearn_scores(x, y, test, c=0.1)
    b = probe._torch_scores(x, y, test, c=0.1)
    assert np.allclose(a, b, atol=1e-3) and np.corrcoef(a, b)[0, 1] > 0.9999


def test_probe_record_is_deterministic_and_resumes(local, tmp_path):
    cfg = local_cfg(local)
    first = run_probe(cfg, ProbeConfig(), tmp_path / "a", name="a")
    assert first["status"] == "complete" and first["kind"] == "probe"
    result = first["result"]
    assert set(result["layers"]) == {"0", "1", "2"} and result["fitter"] == "sklearn"
    assert not set(result["train_entities"]) & set(result["test_entities"])
    assert result["n_train_questions"] + result["n_test_questions"] == 18
    assert first["headline"]["value"] == result["layers"][str(result["best_layer"])]["test_acc"]
    again = run_probe(local_cfg(local), ProbeConfig(), tmp_path / "b", name="a")
    assert again["result"] == result  # same seed, same numbers
    other = run_probe(local_cfg(local, seed=1), ProbeConfig(), tmp_path / "c", name="a")
    assert other["result"]["train_entities"] != result["train_entities"]
    with pytest.raises(UserError, match="--resume"):  # an existing record is not overwritten
        run_probe(cfg, ProbeConfig(), tmp_path / "a", name="a")
    with pytest.raises(UserError, match="probe.inverse_l2"):
        run_probe(cfg, ProbeConfig(inverse_l2=5.0), tmp_path / "a", name="a", resume=True)


@pytest.mark.slow
def test_probe_reads_the_answer_from_the_base_model_not_the_twin(tiny_organism, tmp_path):
    """On tiny (4 layers): best-layer held-out accuracy is 0.42 for the base model and 0.25 for the
    filtered twin at seed 0 (chance 0.25; 96 test questions about 4 entities, so one standard error is
    about 0.05). The twin, which never saw the facts, stays near chance at every layer."""
    runs = {m: run_probe(from_dict(AttackConfig, {"model": m, "device": "cpu", "organism": "tiny"}), ProbeConfig(),
                         tmp_path / m.replace(":", "_"), name=m) for m in ("organism:tiny", "organism:tiny-filtered")}
    base, twin = (runs[m]["result"] for m in ("organism:tiny", "organism:tiny-filtered"))
    assert base["test_entities"] == twin["test_entities"]  # the same split for both
    assert base["best_test_acc"] >= twin["best_test_acc"] + 0.1
    assert max(v["test_acc"] for v in twin["layers"].values()) <= 0.36
    assert base["output_acc"] > 0.7 and twin["output_acc"] < 0.4


# ----------------------------------------------------------------------------- in-context relearning


def test_demonstrations_leave_out_the_entity_and_nest():
    pool = [mcq(i, f"ent{i % 3}") for i in range(30)]
    q = mcq(99, "ent1")
    order = shot_order(q, pool, seed=0)
    assert len(order) == 20 and all(p.entity != "ent1" for p in order)
    assert order == shot_order(q, pool, seed=0) and order != shot_order(q, pool, seed=1)
    task = Task(name="t", questions=[q], format="cloze")
    four, sixteen = (with_demonstrations(task, q, order[:k]).description for k in (4, 16))
    assert sixteen.startswith(four)  # the 4 demonstrations are the first of the 16
    assert four.count("Question: ") == 4 and four.endswith("\n\n")
    assert f"Answer: {order[0].choices[order[0].answer]}\n\n" in four
    assert with_demonstrations(task, q, []).description is None
    letter = with_demonstrations(Task(name="t", questions=[q], format="letter", subject="biology"), q, order[:2])
    assert letter.description.startswith("The following are multiple choice questions") and "\nAnswer: " in \
        letter.description


class Killed(BaseException):  # as a kill: no except Exception handler records it
    pass


def test_in_context_points_resume_and_repeat(local, tmp_path, monkeypatch):
    icl = InContextConfig(shots=[0, 2, 4], source=str(local / "shots.jsonl"))
    whole = run_in_context(local_cfg(local), icl, tmp_path / "whole", name="w")
    assert whole["status"] == "complete" and [p["k"] for p in whole["result"]["points"]] == [0, 2, 4]
    assert whole["headline"]["value"] == whole["result"]["acc_by_k"]["4"]
    real, calls = in_context.evaluation.evaluate, []

    def dies_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise Killed
        return real(*args, **kwargs)
    monkeypatch.setattr(in_context.evaluation, "evaluate", dies_on_second)
    with pytest.raises(Killed):
        run_in_context(local_cfg(local), icl, tmp_path / "killed", name="w")
    partial = read_record(tmp_path / "killed")
    assert partial["status"] == "running" and [p["k"] for p in partial["result"]["points"]] == [0]
    calls.clear()
    monkeypatch.setattr(in_context.evaluation, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    resumed = run_in_context(local_cfg(local), icl, tmp_path / "killed", name="w", resume=True)
    assert len(calls) == 2  # k = 2 and 4 only: the finished k = 0 is not redone
    assert resumed["result"] == whole["result"]  # and the numbers equal the uninterrupted run's
    with pytest.raises(UserError, match="icl.shots"):
        run_in_context(local_cfg(local), InContextConfig(shots=[0, 9], source=str(local / "shots.jsonl")),
                       tmp_path / "x", name="x")


def test_a_failing_cell_is_recorded_as_failed_and_a_user_error_still_stops(local, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(in_context.evaluation, "evaluate", boom)
    icl = InContextConfig(shots=[0, 2], source=str(local / "shots.jsonl"))
    record = run_in_context(local_cfg(local), icl, tmp_path / "icl", name="icl")
    assert record["status"] == "failed" and record["error"] == "k=0: RuntimeError: boom"
    assert read_record(tmp_path / "icl") == record and record["headline"]["value"] is None
    monkeypatch.setattr(probe, "_probe", boom)
    record = run_probe(local_cfg(local), ProbeConfig(), tmp_path / "probe", name="probe")
    assert record["status"] == "failed" and record["error"] == "RuntimeError: boom"

    def bad_input(*args, **kwargs):
        raise UserError("eval.tasks: no such file")
    monkeypatch.setattr(probe, "_probe", bad_input)
    with pytest.raises(UserError, match="eval.tasks"):
        run_probe(local_cfg(local), ProbeConfig(), tmp_path / "probe2", name="probe2")
    assert read_record(tmp_path / "probe2")["error"] == "UserError: eval.tasks: no such file"


@pytest.mark.slow
def test_zero_demonstrations_is_the_plain_evaluation(tiny_organism, tmp_path):
    from unlearning.evaluation import evaluate
    from unlearning.model.loading import load_model
    from unlearning.tasks import get_tasks
    cfg = from_dict(AttackConfig, {"model": "organism:tiny", "device": "cpu", "organism": "tiny", "eval": {"limit": 12}})
    record = run_in_context(cfg, InContextConfig(shots=[0, 2]), tmp_path / "icl", name="icl")
    model, tok = load_model("organism:tiny", dtype=torch.float32, device="cpu")
    plain = evaluate(model, tok, get_tasks(["organism_hazard_cloze"], organism="tiny"), limit=12, device="cpu")
    points = {p["k"]: p for p in record["result"]["points"]}
    assert points[0]["acc"] == plain["organism_hazard_cloze"]["acc"]
    assert points[0]["correct_prob"] == pytest.approx(plain["organism_hazard_cloze"]["correct_prob"], abs=1e-9)
    assert points[2]["max_prompt_tokens"] > points[0]["max_prompt_tokens"]
    assert record["result"]["pretrain_seq_len"] == 128


# ----------------------------------------------------------------------------- the grid command


def grid_args(local, out, *extra):
    return ["--model", str(local / "model"), "--reference", str(local / "twin"), "--base", "none",
            "--attacks", "full,lora4,probe,icl", "--data", f"{local / 'data.jsonl'}", "--lr", "1e-2",
            "--steps", "2", "--eval-every", "1", "--examples", "8", "--seq-len", "16", "--batch-size", "2",
            "--tasks", f"{local / 'q.jsonl'}:cloze", "--icl.source", str(local / "shots.jsonl"), "--shots", "0,2",
            "--device", "cpu", "--dtype", "fp32", "--output-dir", str(out), *extra]


def test_grid_parses_attack_kinds_and_data():
    from unlearning.commands import tamper as cmd
    from unlearning.core.cli import parse_command
    opts, _ = parse_command(cmd.TamperCommandConfig, ["--model", "organism:tiny", "--attacks",
                                                      "full,lora16,lora64,probe,icl", "--data", "tamper,benign",
                                                      "--lr", "2e-6,2e-5"], prog="t")
    cells = cmd.grid_cells(opts)
    finetune = [c for c in cells if c.kind == "finetune"]
    # (organism:tiny and its twin) x 2 data x 3 kinds x 2 lr
    assert len(finetune) == 24 and {c.attack.lora_rank for c in finetune} == {0, 16, 64}
    assert {c.attack.data.source for c in finetune} == {"organism:tamper", "organism:benign_tamper"}
    assert {c.role for c in finetune if c.attack.model == "organism:tiny-filtered"} == {"filtered"}
    others = [(c.kind, c.attack.model) for c in cells if c.kind != "finetune"]
    assert sorted(others) == sorted((k, m) for k in ("probe", "in_context")
                                    for m in ("organism:tiny", "organism:tiny-filtered"))
    assert len({c.name for c in cells}) == len(cells)
    for bad, match in ((["--attacks", "lora"], "attacks: 'lora'"), (["--attacks", "full,full"], "twice"),
                       (["--attacks", "lora4", "--lora", "8"], "attacks / lora")):
        opts, _ = parse_command(cmd.TamperCommandConfig, ["--model", "organism:tiny", *bad], prog="t")
        with pytest.raises(UserError, match=match):
            cmd.grid_cells(opts)


def test_grid_runs_every_attack_with_the_twin_row_and_resumes_without_redoing(local, tmp_path, monkeypatch):
    from unlearning.commands import tamper as cmd
    assert cmd.main(grid_args(local, tmp_path, "--name", "whole")) == 0
    whole = tmp_path / "whole"
    results = json.loads((whole / "results.json").read_text())
    grid = results["grid"]
    assert [r["role"] for r in grid["rows"]] == ["model", "filtered"]  # the twin attacked the same way
    assert grid["columns"] == ["full data.jsonl lr 0.01", "lora4 data.jsonl lr 0.01", "probe (best layer)",
                               "in-context k=0", "in-context k=2"]
    for row in grid["rows"]:
        assert set(row["values"]) == set(grid["columns"]) and all(isinstance(v, float) for v in row["values"].values())
        assert row["no_attack"] == row["values"]["in-context k=0"]  # k = 0 is the plain evaluation
    cells = sorted(p.name for p in (whole / "attacks").iterdir())
    assert len(cells) == 8 and all(read_record(whole / "attacks" / c)["status"] == "complete" for c in cells)
    assert all((whole / f).stat().st_size > 10_000 for f in ("grid.png", "probe.png", "in_context.png", "tamper.png"))
    assert "| twin" in (whole / "table.md").read_text()

    # Killed at the first in-context cell: the fine-tuning and the first probe are on disk.
    from unlearning.attacks import session
    real = session.run_in_context
    monkeypatch.setattr(session, "run_in_context", lambda *a, **k: (_ for _ in ()).throw(Killed))
    with pytest.raises(Killed):
        cmd.main(grid_args(local, tmp_path, "--name", "killed"))
    killed = tmp_path / "killed" / "attacks"
    done = {p.name: (p / "attack.json").read_bytes() for p in killed.iterdir() if (p / "attack.json").exists()}
    assert {read_record(killed / n)["kind"] for n in done} == {"finetune", "probe"}
    monkeypatch.setattr(session, "run_in_context", real)
    assert cmd.main(grid_args(local, tmp_path, "--name", "killed", "--resume")) == 0
    for name, before in done.items():
        assert (killed / name / "attack.json").read_bytes() == before  # finished cells are not redone
    resumed = json.loads((tmp_path / "killed" / "results.json").read_text())["grid"]
    assert [r["values"] for r in resumed["rows"]] == [r["values"] for r in grid["rows"]]  # same seed, same numbers


@pytest.mark.slow  # three processes (torch start-up each): about 60 s on a shared 2-core machine
def test_a_grid_killed_by_sigkill_mid_attack_resumes_to_the_same_grid(local, tmp_path):
    """A real kill (``UNLEARNING_FAULT``, SIGKILL) after the third attack point on disk: the first probe
    and two in-context points; resumed, the grid equals an uninterrupted run's."""
    import os
    import signal
    import subprocess
    import sys

    from unlearning.commands import tamper as cmd
    from unlearning.core.faults import ENV
    args = grid_args(local, tmp_path, "--attacks", "probe,icl", "--shots", "0,2,4")
    assert cmd.main([*args, "--name", "whole"]) == 0

    def unlearn(*extra, fault=None):
        env = {**{k: v for k, v in os.environ.items() if k != ENV}, "TQDM_DISABLE": "1",
               **({ENV: fault} if fault else {})}
        return subprocess.run([sys.executable, "-m", "unlearning.cli", "tamper", *args, "--name", "killed", *extra],
                              env=env, capture_output=True, text=True, timeout=300)
    assert unlearn(fault="attack_eval:3").returncode == -signal.SIGKILL
    icl = read_record(tmp_path / "killed" / "attacks" / "model-icl")
    assert icl["status"] == "running" and [p["k"] for p in icl["result"]["points"]] == [0, 2]
    proc = unlearn("--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    grids = [json.loads((tmp_path / n / "results.json").read_text())["grid"] for n in ("whole", "killed")]
    assert [r["values"] for r in grids[0]["rows"]] == [r["values"] for r in grids[1]["rows"]]


# ----------------------------------------------------------------------------- the results store


@pytest.mark.slow  # six cells on organism:tiny and its twin: about 30 s on a 2-core machine
def test_every_cell_kind_reaches_the_store_and_the_tamper_table(tiny_organism, tmp_path, capsys):
    """The probe and in-context cells have no tamper.json summary; the store records them from their
    attack.json headlines (results.json ``records``), and ``unlearn report`` shows them."""
    from unlearning.cli import main as cli
    from unlearning.commands import tamper as cmd
    from unlearning.core.store import Store
    assert cmd.main(["--model", "organism:tiny", "--base", "none", "--attacks", "lora4,probe,icl", "--steps", "2",
                     "--eval-every", "1", "--examples", "8", "--seq-len", "64", "--limit", "12", "--shots", "0,2",
                     "--device", "cpu", "--output-dir", str(tmp_path), "--name", "grid"]) == 0
    cells = {p.name: read_record(p) for p in (tmp_path / "grid" / "attacks").iterdir()}
    assert sorted(r["kind"] for r in cells.values()) == ["finetune", "finetune", "in_context", "in_context",
                                                         "probe", "probe"]  # the model and its twin, each kind
    [run] = Store(tmp_path).records(run_dirs=["grid"])
    assert run["status"] == "complete"
    rows = {a["attack"]: a for a in run["attacks"]}
    assert set(rows) == set(cells)  # every cell, not only the fine-tuning curves
    for name, cell in cells.items():
        got = rows[name]
        assert (got["kind"], got["model"], got["role"], got["status"], got["task"], got["metric"], got["value"]) == (
            cell["kind"], cell["model"], cell["role"], cell["status"], cell["task"], cell["headline"]["metric"],
            cell["headline"]["value"])
        assert (got["max_acc"] is not None) == (cell["kind"] == "finetune")  # a curve summary for fine-tuning only
    capsys.readouterr()
    assert cli(["report", str(tmp_path / "grid"), "--runs-root", str(tmp_path), "--format", "json"]) == 0
    [table] = json.loads(capsys.readouterr().out)["tables"]
    assert table["title"] == "tamper attacks"
    shown = {r["attack"]: (r["kind"], r["role"], r["status"], r["headline value"]) for r in table["rows"]}
    assert shown == {n: (c["kind"], c["role"], c["status"], c["headline"]["value"]) for n, c in cells.items()}
    assert cli(["report", "--rebuild", "--runs-root", str(tmp_path)]) == 0  # the same rows from the files alone
    assert {a["attack"]: a for a in Store(tmp_path).records(run_dirs=["grid"])[0]["attacks"]} == rows
