"""The contract between the shared training loop and what it trains: a :class:`Method`.

Every hook the loop (:func:`unlearning.training.loop.train`) and the runner call is declared here,
with its default, so neither probes a method with ``getattr``. An unlearning method and the tamper
attack are both Methods: the loop owns the mechanics (accumulation, precision, clipping, filters,
L2-SP, metrics, checkpoints), a Method says what to optimise and when something else must happen.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class Phase:
    """A stretch of training with one set of trainable parameters (e.g. one target layer)."""
    index: int
    steps: int
    layer: int | None = None
    name: str = ""


@dataclass
class StepContext:
    phase: Phase
    step: int            # optimizer step within the phase, from 0
    global_step: int     # optimizer steps before this one, over the whole run
    total_steps: int

    @property
    def phase_progress(self) -> float:
        return self.step / max(1, self.phase.steps)


@dataclass
class LossTerms:
    """Named loss terms, already multiplied by their coefficients, plus plain numbers to log.

    ``forget`` and ``retain`` are kept apart so gradient filters can take their gradients separately.
    """
    forget: dict[str, torch.Tensor] = field(default_factory=dict)
    retain: dict[str, torch.Tensor] = field(default_factory=dict)
    logs: dict[str, torch.Tensor | float] = field(default_factory=dict)  # tensors: detached, 0-d

    def total(self) -> torch.Tensor:
        terms = list(self.forget.values()) + list(self.retain.values())
        return torch.stack([t.float() for t in terms]).sum()

    @staticmethod
    def merge(stages: "Iterable[LossTerms]") -> "LossTerms":
        """One set of terms from several stages (later stages' names win; they never clash)."""
        out = LossTerms()
        for t in stages:
            out.forget.update(t.forget)
            out.retain.update(t.retain)
            out.logs.update(t.logs)
        return out


class Method(abc.ABC):
    """What the loop trains. ``phases``, ``begin_phase`` and ``losses`` are required; the rest
    have defaults that do nothing.

    Order of calls: ``restore`` (resume only) -> per phase: ``begin_phase``, per step ``losses``
    (once per micro-batch), then ``checkpoint_due`` and ``on_step``; ``end_phase`` after its last
    step. ``state_dict`` / ``load_state_dict`` carry the method's own random state (e.g. a
    generator for random targets) through a checkpoint, so a resumed run repeats the original.
    """

    name: str = "method"

    @abc.abstractmethod
    def phases(self) -> list[Phase]:
        """The phases in training order (their ``index`` is their position)."""

    @abc.abstractmethod
    def begin_phase(self, model: nn.Module, phase: Phase) -> list[tuple[str, nn.Parameter]]:
        """Make this phase's parameters trainable (others frozen) and return them by name."""

    @abc.abstractmethod
    def losses(self, model: nn.Module, batches: dict[str, dict[str, torch.Tensor]],
               ctx: StepContext) -> LossTerms:
        """The loss terms of one micro-batch (``batches`` maps a stream name to its batch)."""

    def loss_stages(self, model: nn.Module, batches: dict[str, dict[str, torch.Tensor]],
                    ctx: StepContext) -> Iterator[LossTerms]:
        """The micro-batch's terms in stages: the loop backpropagates each stage before it asks
        for the next, so one stage's activations are freed before the next stage's forward pass
        runs (the peak holds one stage's graph, not all of them). The stages together must equal
        :meth:`losses`. Default: one stage. The loop calls this hook, not :meth:`losses`: a method
        that overrides it (sequential, representation) defines ``losses`` as the merge of its
        stages, so a subclass changes its terms here."""
        yield self.losses(model, batches, ctx)

    def end_phase(self, model: nn.Module, phase: Phase) -> None:
        """Called after the phase's last step (e.g. to free a teacher)."""

    def restore(self, model: nn.Module, finished: list[Phase]) -> None:
        """On resume, before saved weights are loaded: rebuild state of the finished phases."""

    def on_step(self, record: dict[str, Any]) -> None:
        """Called after every optimizer step (and after a due checkpoint is on disk) with the
        step's record: ``step`` (global, from 1), ``phase``, ``phase_step``, ``lr``, ``grad_norm``,
        each ``<term>_term`` and each logged value, as floats. May evaluate; an exception stops
        the run (the last checkpoint stays)."""

    def checkpoint_due(self, global_step: int) -> bool:
        """Whether the loop must checkpoint after optimizer step ``global_step`` (from 1), besides
        phase ends and ``train.checkpoint_every`` (the attack: at each evaluation step)."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """The method's own state a checkpoint must carry (tensors, numbers, strings)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Put back what :meth:`state_dict` returned."""

    @property
    def train_summary(self) -> dict[str, Any] | None:
        """Training metrics the runner writes to results as ``train_summary`` (None: none)."""
        return None

    @property
    def save_name(self) -> str | None:
        """The folder name under ``save.models_dir`` (None: the run's name)."""
        return None
