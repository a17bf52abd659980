"""`unlearn run` with the sequential method end to end on a local tiny model: saving, metrics, NaN, resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from run_setup import fail_in_second_phase, make_local_job
from unlearning.methods import sequential as seq
from unlearning.runner import run
from unlearning.training.checkpoint import Checkpointer


@pytest.fixture
def local_job(tmp_path):
    """A saved tiny GPT-NeoX model, forget/retain corpora and a question file; returns a config factory."""
    return make_local_job(tmp_path)


def _weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_run_saves_lora_adapter_and_merged_model_and_logs_every_step(local_job):
    results = run(local_job("lora"))
    rundir = local_job.root / "lora"
    assert {"before", "after"} <= set(results)
    assert (rundir / "adapter" / "adapter_config.json").exists()
    assert (rundir / "model" / "config.json").exists()
    merged = _weights(rundir / "model")
    assert not any("lora" in k for k in merged)
    records = [json.loads(line) for line in (rundir / "metrics.jsonl").read_text().splitlines()]
    assert [r["layer"] for r in records] == [3, 3, 2, 2, 1, 1]
    for key in ("forget_loss", "retain_loss", "forget_coef", "retain_coef", "lr", "grad_norm", "forget_term"):
        assert all(key in r for r in records), key
    assert json.loads((rundir / "results.json").read_text())["after"]


def test_non_finite_loss_stops_with_step_layer_and_term_and_keeps_the_checkpoint(local_job, monkeypatch, capsys):
    original = seq.Sequential.loss_stages  # the hook the loop calls

    def nan_in_second_phase(self, model, batches, ctx):
        for terms in original(self, model, batches, ctx):
            if ctx.phase.index == 1 and "forget" in terms.forget:
                terms.forget["forget"] = terms.forget["forget"] * float("nan")
            yield terms

    monkeypatch.setattr(seq.Sequential, "loss_stages", nan_in_second_phase)
    from unlearning.cli import main
    import yaml
    cfg_path = local_job.root.parent / "nan.yaml"
    from unlearning.core.config import to_dict
    cfg_path.write_text(yaml.safe_dump(to_dict(local_job("nan"))))
    assert main(["run", str(cfg_path)]) == 2
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if "loss term" in line]
    assert line.startswith("unlearn run: error: loss term 'forget'"), err  # on its own line, not the bar's
    assert "layer 2" in line and "at step 2 " in line and "step 0 of the phase" in line, line
    # the advice fits the settings: clipping is on (max_grad_norm 1.0), the lr is the job's
    assert "optimizer.lr is 0.01" in line and "clip" not in line, line
    rundir = local_job.root / "nan"
    position = Checkpointer(rundir / "checkpoint").position()  # the end of phase 0
    assert (position.phase, position.step, position.global_step) == (1, 0, 2)
    assert "before" in json.loads((rundir / "results.json").read_text())


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_resume_after_a_kill_between_phases_gives_the_same_weights(local_job, monkeypatch, finetune):
    opts = {"finetune": finetune, "forget_loss": "random_ce"}
    uninterrupted = run(local_job(f"full-{finetune}", opts))
    restore = fail_in_second_phase(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        run(local_job(f"killed-{finetune}", opts))
    restore()
    resumed = run(local_job(f"killed-{finetune}", opts), resume=True)
    a = _weights(local_job.root / f"full-{finetune}" / "model")
    b = _weights(local_job.root / f"killed-{finetune}" / "model")
    base = _weights(local_job.root.parent / "model")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], base[k]) for k in a)   # training did change the model
    assert resumed["after"] == uninterrupted["after"]
    records = [json.loads(x) for x in (local_job.root / f"killed-{finetune}" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
