"""Unlearning methods. Each module exposes ``Config`` (its section of the run config) and
``build(model, tokenizer, run_cfg, method_cfg, data) -> common.Method``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

METHODS = {
    "sequential": "unlearning.methods.sequential",
    "checkpoint_transfer": "unlearning.methods.checkpoint_transfer",
    "circuit_breaker": "unlearning.methods.circuit_breaker",
    "rmu": "unlearning.methods.rmu",
}


def method_module(name: str) -> ModuleType:
    from unlearning.core.errors import ConfigError
    if name not in METHODS:
        raise ConfigError(f"method: {name!r} is not known; choose one of {', '.join(METHODS)}")
    return importlib.import_module(METHODS[name])
