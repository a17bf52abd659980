"""The tiny sequential-unlearning set-up the sequential tests share: data, a built method, contexts."""

from __future__ import annotations

import torch

from tiny_models import tiny_model
from unlearning.core.config import from_dict
from unlearning.data.text import TokenizedData
from unlearning.methods import BuildContext
from unlearning.methods import sequential as seq
from unlearning.training.loop import StepContext
from unlearning.runner import RunConfig

CPU = torch.device("cpu")
DEPTH = 4


def make_data(n: int = 8, seq_len: int = 10, seed: int = 0, pad: int = 2) -> TokenizedData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 61, (n, seq_len), generator=g)
    attn = torch.ones_like(ids)
    if pad:
        attn[::2, -pad:] = 0
    return TokenizedData(ids, attn)


def setup(sequential: dict | None = None, train_cfg: dict | None = None, family: str = "gpt_neox",
          n: int = 8, perturb_lora: bool = True):
    """A tiny model, data and the built method; LoRA B matrices are made non-zero so adapters matter."""
    run_cfg = from_dict(RunConfig, {"model": "x", "train": {"batch_size": 2, "grad_accum": 1, **(train_cfg or {})},
                                    "sequential": {"steps_per_layer": 2, **(sequential or {})}})
    data = {"forget": make_data(n), "retain": make_data(n, seed=1)}
    model = tiny_model(family, layers=DEPTH)
    model, method = seq.build(model, context(run_cfg, data), run_cfg.method_config())
    if perturb_lora and method.cfg.finetune == "lora":
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()  # LoRA dropout off: forward passes are deterministic unless a test asks otherwise
    return model, method, data, run_cfg


def context(run_cfg: RunConfig, data: dict, tokenizer=None) -> BuildContext:
    """What the runner passes a method's build."""
    return BuildContext(model_name=run_cfg.model, tokenizer=tokenizer, data=data, device=CPU, train=run_cfg.train,
                        seed=run_cfg.train.seed, model_dtype=run_cfg.model_dtype)


def batch_of(data: TokenizedData, n: int = 4) -> dict:
    return data.rows(torch.arange(n))


def ctx_for(method, phase_index: int = 0, step: int = 0) -> StepContext:
    phase = method.phases()[phase_index]
    return StepContext(phase, step, 0, sum(p.steps for p in method.phases()))
