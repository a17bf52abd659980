"""Effective / stable rank on matrices of known spectrum, on LoRA adapters, and on saved models."""

from __future__ import annotations

import copy
import math

import peft
import pytest
import torch
from tiny_models import save_tiny, tiny_model

from unlearning.core.errors import UserError
from unlearning.core.io import read_json
from unlearning.model.layers import get_parts
from unlearning.reporting.ranks import (effective_rank, lora_update_ranks, matrix_rank_row, read_csv, singular_values,
                              stable_rank, stored_update_ranks, summarize,
                              weight_update_ranks)


def ranks_of(matrix):
    row = matrix_rank_row("m", matrix, device="cpu")
    return row.erank, row.srank, row.fro_norm


def test_rank_one_outer_product():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(40, generator=g, dtype=torch.float64), torch.randn(30, generator=g, dtype=torch.float64)
    erank, srank, fro = ranks_of(torch.outer(u, v))
    assert erank == pytest.approx(1.0, abs=1e-6) and srank == pytest.approx(1.0, abs=1e-9)
    assert fro == pytest.approx(float(u.norm() * v.norm()), rel=1e-5)


@pytest.mark.parametrize("n", [1, 7, 64])
def test_identity_has_full_rank(n):
    erank, srank, fro = ranks_of(torch.eye(n))
    assert erank == pytest.approx(n, rel=1e-9) and srank == pytest.approx(n, rel=1e-9)
    assert fro == pytest.approx(math.sqrt(n))


def test_known_spectrum_follows_the_formulas():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    q1, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    d = q1[:, :5] @ torch.diag(s.double()) @ q2.T  # 8 x 5 with singular values s
    p = s[:4] / s.sum()
    expected_erank = math.exp(float(-(p * p.log()).sum()))
    erank, srank, fro = ranks_of(d)
    assert erank == pytest.approx(expected_erank, rel=1e-9)
    assert srank == pytest.approx((16 + 4 + 1 + 1) / 16, rel=1e-9)
    assert fro == pytest.approx(math.sqrt(22), rel=1e-9)
    assert effective_rank(s) == pytest.approx(expected_erank) and stable_rank(s) == pytest.approx(22 / 16)
    # the float32 path (large matrices) agrees
    big = torch.zeros(600, 520)
    big[:5, :5] = torch.diag(s)
    torch.testing.assert_close(singular_values(big, "cpu")[:5], s.double(), rtol=1e-6, atol=1e-6)


def test_zero_update_is_unchanged_and_left_out_of_means():
    rows = [matrix_rank_row("a", torch.zeros(3, 3)), matrix_rank_row("b", torch.eye(4))]
    assert rows[0].erank is None and rows[0].fro_norm == 0 and not rows[0].changed
    assert summarize(rows) == {"mean_erank": pytest.approx(4), "mean_srank": pytest.approx(4),
                               "n_modules": 2, "n_changed": 1}
    with pytest.raises(ValueError):
        effective_rank(torch.zeros(3))


def test_two_models_differing_in_one_layer():
    base = tiny_model("llama", seed=0)
    new = copy.deepcopy(base)
    q = get_parts(new).layers[1].self_attn.q_proj
    g = torch.Generator().manual_seed(2)
    u, v = torch.randn(q.weight.shape[0], generator=g), torch.randn(q.weight.shape[1], generator=g)
    with torch.no_grad():
        q.weight += torch.outer(u, v)  # rank-1 update
        down = get_parts(new).layers[1].mlp.down_proj.weight
        down += 0.5 * torch.eye(*down.shape)
    rows = {r.module: r for r in weight_update_ranks(base, new, device="cpu", progress=False)}
    changed = {m for m, r in rows.items() if r.changed}
    assert changed == {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    assert rows["model.layers.1.self_attn.q_proj"].erank == pytest.approx(1, abs=1e-4)
    assert rows["model.layers.1.self_attn.q_proj"].srank == pytest.approx(1, abs=1e-6)
    down = rows["model.layers.1.mlp.down_proj"]
    assert down.srank == pytest.approx(32) and down.erank == pytest.approx(32)  # 0.5 * I, 32 x 64
    assert "lm_head" in rows and not rows["lm_head"].changed


def test_stored_update_ranks_match_two_model_ranks():
    from unlearning.model.originals import OriginalWeights
    base = tiny_model("gpt2", seed=0)
    new = copy.deepcopy(base)
    store = OriginalWeights(new)
    store.snapshot(1)
    with torch.no_grad():
        for p in get_parts(new).layers[1].parameters():
            p.add_(torch.randn_like(p) * 0.1)
    stored = {r.module: r for r in stored_update_ranks(new, store, device="cpu", progress=False)}
    full = {r.module: r for r in weight_update_ranks(base, new, device="cpu", progress=False) if r.changed}
    assert stored.keys() == full.keys() == {f"transformer.h.1.{m}" for m in
                                            ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    for m in stored:
        assert stored[m].erank == pytest.approx(full[m].erank, rel=1e-9)
        assert stored[m].srank == pytest.approx(full[m].srank, rel=1e-9)


def lora_model(family="llama", r=4, alpha=8, seed=0, **kw):
    pm = peft.get_peft_model(tiny_model(family), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear",
                                                                  **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return pm


@pytest.mark.parametrize("family, kw", [("llama", {}), ("gpt2", {}), ("qwen2", {"use_rslora": True}),
                                        ("gpt_neox", {"rank_pattern": {"dense": 2}, "alpha_pattern": {"dense": 3}})])
def test_lora_ranks_equal_ranks_of_merged_delta(tmp_path, family, kw):
    pm = lora_model(family, **kw)
    pm.save_pretrained(tmp_path / "adapter")
    from_folder = {r.module: r for r in lora_update_ranks(tmp_path / "adapter", progress=False)}
    in_memory = {r.module: r for r in lora_update_ranks(pm, progress=False)}
    # reference: the explicit delta of each LoRA layer, B @ A * scaling, decomposed directly
    from peft.tuners.lora import LoraLayer
    checked = 0
    for name, mod in pm.named_modules():
        if isinstance(mod, LoraLayer):
            with torch.no_grad():  # float64, so float32 rounding does not add tiny singular values
                delta = mod.lora_B["default"].weight.double() @ mod.lora_A["default"].weight.double()
                ref = matrix_rank_row(name, delta * mod.scaling["default"], device="cpu")
            key = name.removeprefix("base_model.model.")
            for got in (from_folder[key], in_memory[key]):
                assert got.erank == pytest.approx(ref.erank, rel=1e-6)
                assert got.srank == pytest.approx(ref.srank, rel=1e-6)
                assert got.fro_norm == pytest.approx(ref.fro_norm, rel=1e-6)
            assert from_folder[key].erank <= mod.r["default"] + 1e-6
            checked += 1
    assert checked == len(from_folder) > 0


def test_dora_adapter_is_refused(tmp_path):
    peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)) \
        .save_pretrained(tmp_path / "a")
    with pytest.raises(UserError, match="DoRA"):
        lora_update_ranks(tmp_path / "a")


def test_ranks_command_on_saved_models(tmp_path, tmp_runs, capsys):
    from unlearning.commands.ranks import main
    base = save_tiny(tmp_path / "base", "gpt_neox", seed=0)
    new = copy.deepcopy(base)
    w = get_parts(new).layers[2].attention.dense.weight
    with torch.no_grad():
        w += torch.diag(torch.tensor([3.0, 1.0, 1.0] + [0.0] * (w.shape[0] - 3)))
    run = tmp_path / "run"
    save_tiny(run / "model", model=new)
    (run / "results.json").write_text('{"after": {"acc": 0.5}}')
    assert main(["--base", str(tmp_path / "base"), "--model", str(run), "--device", "cpu"]) == 0
    results = read_json(run / "results.json")
    assert results["after"] == {"acc": 0.5}  # merged into the run's results, not replaced
    p = torch.tensor([3.0, 1.0, 1.0]) / 5
    assert results["mean_erank"] == pytest.approx(math.exp(float(-(p * p.log()).sum())), rel=1e-5)
    assert results["mean_srank"] == pytest.approx(11 / 9, rel=1e-5)
    assert results["ranks"]["n_changed"] == 1 and results["ranks"]["source"] == "full"
    rows = read_csv(run / "ranks.csv")
    assert [r.module for r in rows if r.changed] == ["gpt_neox.layers.2.attention.dense"]
    assert rows[0].shape and "mean_erank" in capsys.readouterr().out
    # a LoRA run directory: ranks come from its adapter, no --base needed; --output-dir elsewhere
    lora_model("gpt_neox").save_pretrained(run / "adapter")
    out = tmp_path / "out"
    assert main(["--model", str(run), "--output-dir", str(out)]) == 0
    lora_results = read_json(out / "results.json")
    assert lora_results["ranks"]["source"] == "lora" and 1 <= lora_results["mean_srank"] <= 4
    with pytest.raises(UserError, match="--base"):
        main(["--model", str(tmp_path / "base"), "--output-dir", str(out)])
