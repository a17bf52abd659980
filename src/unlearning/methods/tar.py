"""TAR (Tamirisa et al. 2024, "Tamper-Resistant Safeguards for Open-Weight LLMs"), first-order.

Each outer step (each micro-batch):

1. an adversary is drawn from the attack grid (``adversary_lrs`` x ``adversary_steps`` x
   ``adversary_lora_ranks``; rank 0 is full fine-tuning) with the method's own generator;
2. the adversary fine-tunes a functional copy of the trainable parameters (never the model's own:
   ``torch.func.functional_call``) for K steps of AdamW on next-token loss over its own stream of
   hazard text (``adversary_data``: the run's forget rows, or e.g. ``organism:tamper``), clipped
   like the tamper attack's recipe; LoRA adversaries train ``B @ A`` deltas on every 2-D weight of
   the trained decoder layers;
3. the tamper-resistance loss (a forget loss of the sequential family,
   :func:`unlearning.methods.sequential_losses.forget_loss`: max-entropy by default) is taken on
   the run's forget batch through the ATTACKED parameters ``theta_K``. First-order meta-gradient:
   the forward pass uses ``theta + stop_grad(theta_K - theta)``, so its value is the post-attack
   model's and the gradient that reaches ``theta`` is dL/d theta_K;
4. the retain loss is the representation MSE of the current model's hidden states to the
   original model's (:func:`unlearning.training.hidden_losses.mse_to_teacher` at ``retain_layers``, the
   original through :mod:`unlearning.model.originals`), optionally plus next-token loss.

The loop (:mod:`unlearning.training.loop`) does the outer optimisation; the adversary's generator
and stream position go through ``state_dict``, so a resumed run draws the same adversaries.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from unlearning.core.config import param
from unlearning.core.errors import ConfigError
from unlearning.data.text import BatchStream, TextSource, load_texts, tokenize
from unlearning.methods.context import BuildContext
from unlearning.methods.representation import forward_hidden
from unlearning.methods.sequential_losses import forget_loss
from unlearning.model.layers import get_parts, parse_layer_spec
from unlearning.model.originals import OriginalWeights, original_model
from unlearning.organism import organism_preset
from unlearning.training import hidden_losses, losses
from unlearning.training.contract import LossTerms, Method, Phase, StepContext

log = logging.getLogger(__name__)

TRKind = Literal["max_entropy_kl", "top_k_entropy", "random_ce"]


@dataclass
class Config:
    """The ``tar:`` section of a run config."""
    steps: int = param(40, min=1, help="outer optimizer steps")
    layers: str | list[int] = param("all", help="decoder layers that train (fully): 'all', a list or '3->1'")
    adversary_lrs: list[float] = param([1e-4, 5e-4, 1e-3], help="the adversaries' AdamW learning rates")
    adversary_steps: list[int] = param([4, 8], help="the adversaries' inner steps K")
    adversary_lora_ranks: list[int] = param([0], help="0: full fine-tuning adversary; r > 0: LoRA of rank r "
                                                      "(alpha 2r) on every 2-D weight of the trained layers")
    adversary_data: TextSource | None = param(None, help="the adversaries' text; null: the run's forget rows")
    adversary_batch_size: int | None = param(None, min=1, help="rows per inner step (null: train.batch_size)")
    adversary_max_grad_norm: float = param(1.0, min=0, help="inner-step gradient clipping (0: off), as the "
                                                            "tamper attack clips")
    tr_loss: TRKind = param("max_entropy_kl", help="tamper-resistance loss after the attack: max_entropy_kl, "
                                                   "top_k_entropy or random_ce (the sequential family's)")
    top_k: int = param(100, min=2, help="tr_loss top_k_entropy: K")
    tr_coef: float = param(1.0, min=0, help="coefficient of the tamper-resistance loss")
    retain_coef: float = param(1.0, min=0, help="coefficient of the representation MSE to the original")
    retain_layers: str | list[int] = param("all", help="layers whose hidden states the retain MSE compares")
    retain_nll_coef: float = param(0.0, min=0, help="also next-token loss on the retain batch, this coefficient")

    def __post_init__(self) -> None:
        for key in ("adversary_lrs", "adversary_steps", "adversary_lora_ranks"):
            values = getattr(self, key)
            if not values:
                raise ConfigError(f"tar.{key}: the attack grid needs at least one value")
        if any(not (isinstance(v, (int, float)) and v > 0) for v in self.adversary_lrs):
            raise ConfigError(f"tar.adversary_lrs: {self.adversary_lrs} must all be numbers > 0")
        if any(not isinstance(k, int) or k < 1 for k in self.adversary_steps):
            raise ConfigError(f"tar.adversary_steps: {self.adversary_steps} must all be integers >= 1")
        if any(not isinstance(r, int) or r < 0 for r in self.adversary_lora_ranks):
            raise ConfigError(f"tar.adversary_lora_ranks: {self.adversary_lora_ranks} must be integers >= 0")


def layer_list(spec: str | list[int], depth: int, key: str) -> list[int]:
    return list(range(depth)) if spec == "all" else sorted(parse_layer_spec(spec, depth, field=key))


@dataclass
class Adversary:
    lr: float
    steps: int
    lora_rank: int = 0


@dataclass
class AttackResult:
    """What the inner attack leaves: the attacked parameters (detached) and its losses."""
    adapted: dict[str, Tensor]
    nll: list[float] = field(default_factory=list)  # tensors until the loop's one sync: kept as 0-d tensors


def _lora_targets(named: dict[str, nn.Parameter]) -> list[str]:
    return [n for n, p in named.items() if p.dim() == 2 and n.endswith(".weight")]


class TAR(Method):
    """One phase of ``steps`` outer steps; see the module docstring."""

    name = "tar"

    def __init__(self, cfg: Config, trainable: list[str], originals: OriginalWeights, retain_layers: list[int],
                 adversary_stream: BatchStream, seed: int = 0):
        self.cfg, self.trainable, self.originals = cfg, trainable, originals
        self.retain_layers = retain_layers
        self.stream = adversary_stream
        self.generator = torch.Generator().manual_seed(seed * 1_000_003 + 17)

    # -- the loop's hooks

    def phases(self) -> list[Phase]:
        return [Phase(index=0, steps=self.cfg.steps, name="tar")]

    def begin_phase(self, model: nn.Module, phase: Phase) -> list[tuple[str, nn.Parameter]]:
        wanted = set(self.trainable)
        for n, p in model.named_parameters():
            p.requires_grad_(n in wanted)
        return [(n, p) for n, p in model.named_parameters() if n in wanted]

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "adversary_stream": self.stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "generator" in state:
            self.generator.set_state(state["generator"])
        if "adversary_stream" in state:
            self.stream.load_state_dict(state["adversary_stream"])

    # -- the adversary

    def sample_adversary(self) -> Adversary:
        def pick(values: list[Any]) -> Any:
            return values[int(torch.randint(len(values), (1,), generator=self.generator))]
        return Adversary(lr=float(pick(self.cfg.adversary_lrs)), steps=int(pick(self.cfg.adversary_steps)),
                         lora_rank=int(pick(self.cfg.adversary_lora_ranks)))

    def inner_attack(self, model: nn.Module, adversary: Adversary) -> AttackResult:
        """K AdamW steps of next-token loss on a functional copy of the trainable parameters."""
        named = {n: p for n, p in model.named_parameters() if n in set(self.trainable)}
        device = next(iter(named.values())).device
        base = {n: p.detach() for n, p in named.items()}
        if adversary.lora_rank == 0:
            leaves = {n: t.clone().requires_grad_(True) for n, t in base.items()}

            def weights() -> dict[str, Tensor]:
                return leaves
        else:
            r, scale = adversary.lora_rank, 2.0  # alpha = 2 r, as the tamper attack's --lora
            targets = _lora_targets(named)
            leaves = {}
            for n in targets:
                out_dim, in_dim = base[n].shape
                a = torch.randn(r, in_dim, generator=self.generator) / math.sqrt(in_dim)  # peft: B = 0, A random
                leaves[f"{n}.A"] = a.to(device, base[n].dtype).requires_grad_(True)
                leaves[f"{n}.B"] = torch.zeros(out_dim, r, device=device, dtype=base[n].dtype, requires_grad=True)

            def weights() -> dict[str, Tensor]:
                return {n: base[n] + scale * leaves[f"{n}.B"] @ leaves[f"{n}.A"] for n in targets}
        opt = torch.optim.AdamW(list(leaves.values()), lr=adversary.lr, weight_decay=0.0)
        result = AttackResult(adapted={})
        for _ in range(adversary.steps):
            batch = {k: v.to(device) for k, v in next(self.stream).items()}
            logits = functional_call(model, weights(), (), {"input_ids": batch["input_ids"],
                                     "attention_mask": batch["attention_mask"], "use_cache": False}).logits
            nll = losses.nll(logits, batch["input_ids"], batch["attention_mask"])
            grads = torch.autograd.grad(nll, list(leaves.values()))  # the model's own .grad stays untouched
            for leaf, g in zip(leaves.values(), grads):
                leaf.grad = g
            if self.cfg.adversary_max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(leaves.values()), self.cfg.adversary_max_grad_norm)
            opt.step()
            result.nll.append(nll.detach())
        with torch.no_grad():
            result.adapted = {n: w.detach().clone() for n, w in weights().items()}
        return result

    # -- losses

    def tamper_resistance(self, model: nn.Module, batch: dict[str, Tensor], adapted: dict[str, Tensor]) -> Tensor:
        """The forget loss through the attacked parameters; its gradient w.r.t. the live parameters
        is its gradient w.r.t. the attacked ones (first-order)."""
        live = dict(model.named_parameters())
        straight = {n: live[n] + (w - live[n]).detach() for n, w in adapted.items()}
        logits = functional_call(model, straight, (), {"input_ids": batch["input_ids"],
                                 "attention_mask": batch["attention_mask"], "use_cache": False}).logits
        return forget_loss(self.cfg.tr_loss, logits, batch, top_k=self.cfg.top_k, generator=self.generator)

    def retain_terms(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        mask = batch["attention_mask"].bool()
        need_logits = self.cfg.retain_nll_coef > 0
        hidden, logits = forward_hidden(model, batch, self.retain_layers, logits=need_logits)
        with torch.no_grad(), original_model(model, self.originals):
            hidden0, _ = forward_hidden(model, batch, self.retain_layers, logits=False)
        mse = hidden_losses.mse_to_teacher(hidden, hidden0, mask)
        terms = {"retain_mse": self.cfg.retain_coef * mse}
        if need_logits:
            terms["retain_nll"] = self.cfg.retain_nll_coef * losses.nll(logits, batch["input_ids"], mask)
        return terms, mse

    def losses(self, model: nn.Module, batches: dict[str, dict[str, Tensor]], ctx: StepContext) -> LossTerms:
        adversary = self.sample_adversary()
        attack = self.inner_attack(model, adversary)
        tr = self.tamper_resistance(model, batches["forget"], attack.adapted)
        retain, mse = self.retain_terms(model, batches["retain"])
        logs: dict[str, Tensor | float] = {
            "forget_loss": tr.detach(), "tr_loss": tr.detach(), "retain_loss": mse.detach(),
            "retain_mse_loss": mse.detach(), "forget_coef": self.cfg.tr_coef, "retain_coef": self.cfg.retain_coef,
            "adversary_lr": adversary.lr, "adversary_steps": float(adversary.steps),
            "adversary_lora_rank": float(adversary.lora_rank),
            "adversary_nll_first": attack.nll[0], "adversary_nll_last": attack.nll[-1]}
        return LossTerms(forget={"tamper_resistance": self.cfg.tr_coef * tr}, retain=retain, logs=logs)


def adversary_rows(cfg: Config, ctx: BuildContext) -> Any:
    """The adversaries' token rows: the run's forget rows, or ``adversary_data`` at the run's seq_len."""
    if cfg.adversary_data is None:
        return ctx.data["forget"]
    seq_len = ctx.data["forget"].input_ids.shape[1]
    records = load_texts(cfg.adversary_data, organism_preset(ctx.model_name))
    return tokenize(records, ctx.tokenizer, seq_len, source=cfg.adversary_data.source)


def build(model: nn.Module, ctx: BuildContext, cfg: Config) -> tuple[nn.Module, TAR]:
    """Full fine-tuning of the chosen decoder layers; the originals of just those are stored."""
    parts = get_parts(model)
    depth = len(parts.layers)
    layers = layer_list(cfg.layers, depth, "tar.layers")
    retain_layers = layer_list(cfg.retain_layers, depth, "tar.retain_layers")
    originals = OriginalWeights(model)
    owner = {id(p): i for i, layer in enumerate(parts.layers) for p in layer.parameters()}
    trainable = [n for n, p in model.named_parameters() if owner.get(id(p)) in set(layers)]
    for L in layers:
        originals.snapshot(L)
    for p in model.parameters():
        p.requires_grad_(False)
    stream = BatchStream(adversary_rows(cfg, ctx), cfg.adversary_batch_size or ctx.train.batch_size,
                         seed=ctx.seed * 1_000_003 + 29)
    log.info("tar: layers %s train (%d tensors); adversaries lr %s x K %s x LoRA rank %s on %s; %d outer steps",
             layers, len(trainable), cfg.adversary_lrs, cfg.adversary_steps, cfg.adversary_lora_ranks,
             cfg.adversary_data.source if cfg.adversary_data else "the forget rows", cfg.steps)
    return model, TAR(cfg, trainable, originals, retain_layers, stream, seed=ctx.seed)


def validate(cfg: Config, depth: int) -> None:
    layer_list(cfg.layers, depth, "tar.layers")
    layer_list(cfg.retain_layers, depth, "tar.retain_layers")
