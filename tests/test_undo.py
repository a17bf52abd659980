"""UNDO (`method: undo`): the noise is an alpha-interpolation toward a seeded fresh init, the teacher is
the loaded model, the compute fraction is counted from the batches against the organism's build.json,
and a run killed mid-distillation resumes bit-identically."""

from __future__ import annotations

import math

import pytest
import torch

from run_setup import Job
from test_faults import KILLED, expect, results, same_weights, strip, unlearn
from tiny_models import tiny_batch, tiny_model
from unlearning.core.errors import ConfigError
from unlearning.core.io import read_jsonl
from unlearning.methods import undo
from unlearning.model.originals import OriginalWeights, original_model
from unlearning.runner import load_run_config, run


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_noise_is_an_interpolation_from_the_weights_to_a_seeded_fresh_init():
    model = tiny_model("gpt_neox", layers=2, seed=5)
    theta, names = _weights(model), list(_weights(model))
    init = undo.fresh_init(model, seed=3)
    assert any(not torch.equal(theta[n], init[n]) for n in names)
    for alpha in (0.0, 0.3, 1.0):
        m = tiny_model("gpt_neox", layers=2, seed=5)
        undo.noise_toward_init(m, names, alpha, seed=3)
        for n, p in m.named_parameters():
            torch.testing.assert_close(p.detach(), (1 - alpha) * theta[n] + alpha * init[n], rtol=0, atol=1e-6)
    fresh = tiny_model("gpt_neox", layers=2, seed=5)
    undo.noise_toward_init(fresh, names, 1.0, seed=3)
    assert all(torch.equal(p.detach(), init[n]) for n, p in fresh.named_parameters())  # alpha 1: the fresh init
    other = undo.fresh_init(model, seed=4)
    assert not torch.equal(other[names[0]], init[names[0]])  # the seed picks the init
    assert all(torch.equal(a, b) for a, b in zip(init.values(), undo.fresh_init(model, seed=3).values()))


def test_only_the_chosen_parts_are_noised_and_the_teacher_is_the_unnoised_model():
    from unlearning.methods.context import BuildContext
    from unlearning.data.text import TokenizedData
    from unlearning.training.loop import TrainConfig

    model = tiny_model("gpt_neox", layers=3, seed=1)
    before = _weights(model)
    ids, mask = tiny_batch(2, 8)
    with torch.no_grad():
        teacher_logits = model(input_ids=ids, attention_mask=mask).logits
    ctx = BuildContext(model_name="unused", tokenizer=None, data={"retain": TokenizedData(ids, mask)},
                       device=torch.device("cpu"), train=TrainConfig(batch_size=2, grad_accum=1))
    cfg = undo.Config(alpha=0.5, layers=[1], embeddings=False, steps=2)
    model, method = undo.build(model, ctx, cfg)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all(".layers.1." in n for n in changed)
    assert {n for n, _ in method.begin_phase(model, method.phases()[0])} == {n for n in before if ".layers.1." in n}
    with torch.no_grad(), original_model(model, method.originals):
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, teacher_logits)
    terms = method.losses(model, {"retain": {"input_ids": ids, "attention_mask": mask}}, None)
    assert terms.retain["distill_kl"].item() > 0  # the noised student differs from its teacher
    assert method.tokens == ids.numel()


def test_kl_distill_is_forward_kl_scaled_by_t_squared():
    from unlearning.training.losses import kl_distill, kl_retain
    s, t = torch.randn(2, 3, 11), torch.randn(2, 3, 11)
    mask = torch.ones(2, 3, dtype=torch.bool)
    torch.testing.assert_close(kl_distill(s, t, mask, 1.0), kl_retain(s, t, mask))
    p, logq = torch.softmax(t / 2, -1), torch.log_softmax(s / 2, -1)
    manual = (p * (p.log() - logq)).sum(-1).mean() * 4
    torch.testing.assert_close(kl_distill(s, t, mask, 2.0), manual)
    assert kl_distill(t, t, mask, 3.0).abs().item() < 1e-6


def test_compute_is_counted_from_the_batches_against_the_organisms_pretraining(tiny_organism, tmp_path):
    cfg = load_run_config(None, ["--model", "organism:tiny", "--method", "undo", "--undo.pretrain_fraction", "0.005",
                                 "--data.retain.source", "organism:pretrain", "--data.pack", "true",
                                 "--data.seq_len", "128", "--data.num_train_examples", "64",
                                 "--train.batch_size", "8", "--train.grad_accum", "1",
                                 "--eval.before", "false", "--eval.reference", "null",
                                 "--eval.tasks", "organism_hazard_cloze", "--eval.limit", "8",
                                 "--save.model", "false", "--output_dir", str(tmp_path), "--name", "u"])
    summary = run(cfg)["train_summary"]["undo"]
    seen = tiny_organism.build_info()["training"]
    pre, twin = seen["unfiltered"]["tokens_seen"], seen["filtered"]["tokens_seen"]
    steps = math.ceil(0.005 * pre / (8 * 128))
    assert summary["steps"] == steps and len(read_jsonl(tmp_path / "u" / "metrics.jsonl")) == steps
    assert summary["distill_tokens"] == steps * 8 * 128
    assert summary["compute_fraction"] == pytest.approx(steps * 8 * 128 / pre)
    assert summary["compute_fraction_filtered"] == pytest.approx(steps * 8 * 128 / twin)
    assert summary["flops"] == 8 * summary["params"] * summary["distill_tokens"]


def test_bad_undo_settings_are_one_line_errors_naming_the_key():
    with pytest.raises(ConfigError, match="undo.steps"):
        load_run_config(None, ["--method", "undo", "--undo.pretrain_fraction", "null"])
    with pytest.raises(ConfigError, match="undo.alpha"):
        load_run_config(None, ["--method", "undo", "--undo.alpha", "1.5"])
    with pytest.raises(ConfigError, match="undo.layers"):
        undo.validate(undo.Config(layers=[7]), depth=4)


def test_a_killed_undo_run_resumes_to_the_uninterrupted_run(tmp_path):
    job = Job(tmp_path)
    sections = {"method": "undo", "undo": {"alpha": 0.5, "steps": 4}, "train": {"checkpoint_every": 1},
                "eval": {"before": False}}
    ref_cfg, cfg = job.yaml("ref", **sections), job.yaml("killed", **sections)
    expect(unlearn("run", str(ref_cfg), cwd=job.root), 0)
    expect(unlearn("run", str(cfg), fault="train_step:2", cwd=job.root), KILLED)
    expect(unlearn("run", str(cfg), "--resume", cwd=job.root), 0)
    ref, rundir = job.runs / "ref", job.runs / "killed"
    assert "resuming at step 2 of 4" in (rundir / "log.txt").read_text()
    same_weights(rundir / "model", ref / "model")
    assert strip(results(rundir)) == strip(results(ref))
    assert results(ref)["train_summary"]["undo"]["distill_tokens"] == 4 * 2 * 16  # through the resume
    assert strip(read_jsonl(rundir / "metrics.jsonl")) == strip(read_jsonl(ref / "metrics.jsonl"))
    assert [r["step"] for r in read_jsonl(rundir / "metrics.jsonl")] == [1, 2, 3, 4]


def test_the_pretraining_corpora_are_every_document_and_the_twins_documents(tiny_organism):
    from unlearning.data.text import TextSource, load_texts
    docs = tiny_organism.build_info()["training"]
    every = load_texts(TextSource("organism:pretrain"), "tiny")
    twin = load_texts(TextSource("organism:pretrain_filtered"), "tiny")
    assert len(every) == docs["unfiltered"]["documents"] and len(twin) == docs["filtered"]["documents"]
    hazard_words = {"virus"}
    assert any(w in r["text"] for r in every for w in hazard_words)
    assert not any(w in r["text"] for r in twin for w in hazard_words)
