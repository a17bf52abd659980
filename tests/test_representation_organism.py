"""The representation methods end to end on the tiny organism (CPU), and the grid's first observation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from unlearning.core.config import from_dict, merge, read_yaml
from unlearning.core.io import read_jsonl
from unlearning.methods import BuildContext
from unlearning.runner import RunConfig, load_run_config, prepare_data, run

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "unlearning" / "configs"
QUICK = ["--model", "organism:tiny", "--device", "cpu", "--data.seq_len", "64", "--data.num_train_examples", "32",
         "--eval.tasks", "[organism_hazard_cloze,organism_general_cloze]", "--eval.limit", "16",
         "--eval.before", "false", "--eval.reference", "null", "--save.models_dir", "null"]

pytestmark = pytest.mark.slow


def _quick_run(config: str, tmp_path: Path, name: str, *overrides: str) -> tuple[dict, list[dict], Path]:
    cfg = load_run_config(CONFIGS / config, [*QUICK, "--output_dir", str(tmp_path / "runs"), "--name", name,
                                             *overrides])
    results = run(cfg)
    rundir = tmp_path / "runs" / name
    return results, read_jsonl(rundir / "metrics.jsonl"), rundir


def _finite(records: list[dict], keys: list[str]) -> None:
    for r in records:
        for k in keys:
            assert k in r, (k, r)
            assert math.isfinite(r[k]), (k, r)


def test_checkpoint_transfer_end_to_end(tiny_organism, tmp_path):
    results, records, rundir = _quick_run(
        "checkpoint_transfer_kl.yaml", tmp_path, "ct", "--checkpoint_transfer.steps", "4",
        "--checkpoint_transfer.summary_step", "3", "--save.models_dir", str(tmp_path / "models"))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    _finite(records, ["retain_kl_loss", "cb_loss", "retain_acc", "forget_acc", "retain_coef", "forget_coef", "lr"])
    assert records[0]["retain_coef"] == 0.0 and records[0]["forget_coef"] == 5.0  # the notebook's ramp
    assert results["train_summary"]["step"] == 3
    assert results["train_summary"]["cb_loss"] == records[2]["cb_loss"]
    assert set(results["after"]) == {"organism_hazard_cloze", "organism_general_cloze"}
    saved = Path(results["models_dir"])
    assert saved.name == "organism-tiny_kl_ret5_rm5"
    assert (saved / "config.json").exists() and (saved / "adapter" / "adapter_config.json").exists()
    assert (rundir / "adapter").exists() and (rundir / "model").exists()


def test_circuit_breaker_end_to_end(tiny_organism, tmp_path):
    results, records, _ = _quick_run("circuit_breaker.yaml", tmp_path, "cb", "--circuit_breaker.steps", "3",
                                     "--circuit_breaker.orth_coef", "0.1", "--circuit_breaker.metrics_every", "2")
    _finite(records, ["retain_l2_loss", "cb_loss", "orth_loss", "retain_coef", "forget_coef"])
    assert [("retain_acc" in r) for r in records] == [False, True, True]  # every 2nd step, and the last
    assert records[0]["cb_loss"] == pytest.approx(1.0, abs=1e-4)  # unchanged representations
    assert results["train_summary"]["step"] == 3  # summary_step 32 > 3 steps: the last step
    assert "after" in results


def test_rmu_end_to_end(tiny_organism, tmp_path):
    results, records, _ = _quick_run("rmu.yaml", tmp_path, "rmu", "--rmu.steps", "3", "--rmu.steering_relative",
                                     "true", "--rmu.steering_coef", "2")
    _finite(records, ["forget_loss", "retain_mse_loss", "retain_coef", "forget_coef"])
    _finite(records[-1:], ["retain_acc", "forget_acc"])  # RMU: every 10th step and the last
    assert "retain_acc" not in records[0]
    assert results["train_summary"]["step"] == 3 and "after" in results


@pytest.mark.parametrize("method", ["checkpoint_transfer", "circuit_breaker"])
def test_lora_methods_change_only_adapter_parameters(tiny_organism, method):
    from unlearning.data.text import BatchStream
    from unlearning.methods import method_module
    from unlearning.training.loop import train
    from unlearning.model.loading import load_model
    model, tok = load_model("organism:tiny", device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cfg = RunConfig(model="organism:tiny", device="cpu", method=method)
    cfg.data.seq_len, cfg.data.num_train_examples = 64, 16
    data = prepare_data(cfg, tok, "tiny")
    mcfg = from_dict(method_module(method).Config, {"steps": 2, "target_layers": [1, 3]})
    ctx = BuildContext(model_name=cfg.model, tokenizer=tok, data=data, device=torch.device("cpu"), train=cfg.train,
                       seed=cfg.train.seed, model_dtype=cfg.model_dtype)
    model, m = method_module(method).build(model, ctx, mcfg)
    streams = {k: BatchStream(v, 4, seed=i) for i, (k, v) in enumerate(data.items())}
    train(model.train(), m, streams, cfg.train, device=torch.device("cpu"))
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert any(not torch.all(p == 0) for n, p in lora.items() if "lora_B" in n)  # the adapters learned
    base = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p
            for n, p in model.named_parameters() if "lora_" not in n}
    assert set(base) == set(before)
    assert all(torch.equal(base[n], before[n]) for n in before)  # no base weight moved


def test_grid_first_observation_higher_retain_coef_gives_lower_kl_and_higher_retain_acc(tiny_organism):
    """The notebook's grid rows with remove_coef 5: a higher retain_coef (3 < 5 < 10) gives, at the same
    steps, a lower retain KL and a higher retain_acc (tiny, 16 steps, a fixed seed; each metric averaged
    over steps 13-16 so that a few tokens cannot decide it)."""
    from unlearning.data.text import BatchStream
    from unlearning.methods import checkpoint_transfer
    from unlearning.training.loop import train
    from unlearning.model.loading import load_model
    from unlearning.core.runtime import seed_everything
    grid = read_yaml(CONFIGS / "grids" / "kl_retain_cb_grid.yaml")
    rows = [r for r in grid["rows"] if r["checkpoint_transfer.remove_coef"] == 5]
    assert [r["checkpoint_transfer.retain_coef"] for r in rows] == [3, 5, 10]
    base = read_yaml(CONFIGS / "checkpoint_transfer_kl.yaml")
    observed = []
    for row in rows:
        cfg = from_dict(RunConfig, merge(base, {"model": "organism:tiny", "device": "cpu"}))
        cfg.data.seq_len = 64
        cfg.train.optimizer.lr = 1e-2  # the tiny model drifts visibly within 16 steps
        mcfg = merge(cfg.checkpoint_transfer, {"retain_coef": row["checkpoint_transfer.retain_coef"],
                                               "remove_coef": row["checkpoint_transfer.remove_coef"],
                                               "steps": 16, "summary_step": 16, "metrics_every": 1,
                                               "target_layers": [1, 2, 3]})
        seed_everything(0)
        model, tok = load_model("organism:tiny", device="cpu")
        data = prepare_data(cfg, tok, "tiny")
        ctx = BuildContext(model_name=cfg.model, tokenizer=tok, data=data, device=torch.device("cpu"),
                           train=cfg.train, seed=cfg.train.seed, model_dtype=cfg.model_dtype)
        model, method = checkpoint_transfer.build(model, ctx, from_dict(checkpoint_transfer.Config, mcfg))
        streams = {k: BatchStream(v, cfg.train.batch_size, seed=i) for i, (k, v) in enumerate(data.items())}
        records: list[dict] = []
        train(model.train(), method, streams, cfg.train, device=torch.device("cpu"), on_step=records.append)
        last = records[-4:]
        observed.append((sum(r["retain_kl_loss"] for r in last) / 4, sum(r["retain_acc"] for r in last) / 4))
    print("retain_kl_loss, retain_acc over steps 13-16 for retain_coef 3, 5, 10:", observed)
    kl, acc = zip(*observed)
    assert kl[0] > kl[1] > kl[2], observed
    assert acc[0] < acc[1] < acc[2], observed


def test_fit_affine_command_and_checkpoint_transfer_through_the_map(tiny_organism, tmp_path, capsys):
    from unlearning.model.affine import load_affine, read_affine_metadata
    from unlearning.commands import fit_affine
    out = tmp_path / "affine.safetensors"
    assert fit_affine.main(["--model", "organism:tiny", "--checkpoint", "filtered", "--layers", "1,3",
                            "--num-examples", "16", "--seq-len", "64", "--device", "cpu", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "mse mapped" in table and str(out) in table
    meta = read_affine_metadata(out)
    assert meta["teacher"] == "organism:tiny-filtered" and meta["layers"] == [1, 3]
    for stats in meta["stats"].values():  # a different training run: the map must beat the identity
        assert stats["mse_affine"] < stats["mse_identity"]
    assert set(load_affine(out)) == {1, 3}
    results, records, _ = _quick_run(
        "checkpoint_transfer_filtered.yaml", tmp_path, "ct-affine", "--checkpoint_transfer.steps", "2",
        "--checkpoint_transfer.target_layers", "[1,3]", "--checkpoint_transfer.affine", str(out))
    _finite(records, ["cb_loss", "retain_kl_loss", "forget_acc"])
    with pytest.raises(Exception, match="not for target layers \\[2\\]"):
        _quick_run("checkpoint_transfer_filtered.yaml", tmp_path, "ct-affine-bad", "--checkpoint_transfer.steps", "2",
                   "--checkpoint_transfer.target_layers", "[1,2]", "--checkpoint_transfer.affine", str(out))
