"""Unlearning methods and the registry the runner picks them from.

The contract each module in :data:`METHODS` fulfils:

- ``Config``: a dataclass, its section of the run config (``<method>:``);
- ``build(model, ctx: BuildContext, cfg: Config) -> tuple[nn.Module, Method]``: set the method up
  (target layers, masks, LoRA or full fine-tuning, steps) and return the model to train (e.g.
  wrapped in adapters) and a :class:`unlearning.training.contract.Method`, whose hooks (phases,
  begin_phase, losses, end_phase, restore, on_step, checkpoint_due, state_dict / load_state_dict,
  train_summary, save_name) the shared loop and the runner call. A method never sees the run
  config: what it needs of the run is in :class:`BuildContext`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from unlearning.core.errors import ConfigError
from unlearning.methods.context import BuildContext

__all__ = ["METHODS", "BuildContext", "method_module"]

METHODS = {
    "sequential": "unlearning.methods.sequential",
    "checkpoint_transfer": "unlearning.methods.checkpoint_transfer",
    "circuit_breaker": "unlearning.methods.circuit_breaker",
    "rmu": "unlearning.methods.rmu",
    "undo": "unlearning.methods.undo",
    "tar": "unlearning.methods.tar",
}


def method_module(name: str) -> ModuleType:
    if name not in METHODS:
        raise ConfigError(f"method: {name!r} is not known; choose one of {', '.join(METHODS)}")
    return importlib.import_module(METHODS[name])
