"""Affine maps teacher -> model: ridge fit recovers a known map; save/load round trip; fit on models."""

from __future__ import annotations

import pytest
import torch

from tiny_models import tiny_model
from unlearning.model.affine import (RidgeAccumulator, fit_affine_maps, fit_ridge, load_affine, read_affine_metadata,
                               save_affine)
from unlearning.core.errors import UserError


def test_ridge_fit_recovers_a_known_affine_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g) * 3 + 1
    w = torch.randn(5, 8, generator=g)
    b = torch.randn(5, generator=g)
    y = x @ w.T + b
    m = fit_ridge(x, y, ridge=1e-9)
    assert torch.allclose(m.weight, w, atol=1e-4)
    assert torch.allclose(m.bias, b, atol=1e-4)
    assert torch.allclose(m(x), y, atol=1e-3)


def test_streaming_accumulation_equals_one_shot_and_ridge_shrinks():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 6, generator=g)
    y = x @ torch.randn(6, 4, generator=g) + 0.1 * torch.randn(300, 4, generator=g)
    acc = RidgeAccumulator(6, 4)
    for chunk in range(0, 300, 70):
        acc.update(x[chunk:chunk + 70], y[chunk:chunk + 70])
    assert torch.allclose(acc.solve(1e-3).weight, fit_ridge(x, y, 1e-3).weight, atol=1e-5)
    assert fit_ridge(x, y, 10.0).weight.norm() < fit_ridge(x, y, 1e-6).weight.norm()


def test_save_and_load_round_trip(tmp_path):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 4, generator=g)
    maps = {3: fit_ridge(x, x * 2 + 1), 5: fit_ridge(x, -x)}
    path = save_affine(tmp_path / "maps.safetensors", maps, {"teacher": "t", "layers": [3, 5]})
    loaded = load_affine(path, [3, 5])
    assert torch.allclose(loaded[3](x), maps[3](x)) and torch.allclose(loaded[5](x), -x, atol=1e-4)
    assert read_affine_metadata(path)["teacher"] == "t"
    with pytest.raises(UserError, match="target layers \\[4\\]"):
        load_affine(path, [3, 4])
    with pytest.raises(UserError, match="fit-affine"):
        load_affine(tmp_path / "missing.safetensors")


def test_fit_between_two_models_beats_the_identity():
    model, teacher = tiny_model("gpt_neox", layers=3, seed=0), tiny_model("gpt_neox", layers=3, seed=1)
    g = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(3, 61, (8, 16), generator=g),
                "attention_mask": torch.ones(8, 16, dtype=torch.long)} for _ in range(20)]
    maps, stats = fit_affine_maps(model, teacher, batches, [1, 2], ridge=1e-3)
    assert set(maps) == {1, 2}
    for s in stats.values():
        assert s["mse_affine"] < s["mse_identity"]
        assert s["mse_affine"] < s["var_model"]  # better than predicting the mean
