"""Tamper attacks: fine-tune an (unlearned) model on hazard-adjacent text and watch accuracy come back.

One *attack* is one model fine-tuned with one recipe (:class:`AttackConfig`): the notebook's
recipe is 512 examples of hazard-adjacent text, lr 2e-5, linear decay, evaluated every 10 steps
up to step 110. On the organism, the tamper corpus (``organism:tamper``) is about hazard entities
*disjoint* from the evaluated ones, so accuracy that comes back on the evaluated entities was
hidden, not relearned; the filtered twin attacked with the same recipe is the "truly absent"
reference, and a benign attack (``organism:benign_tamper``, general prose) separates relearning
from generic damage.

Precision: the weights and the optimizer state stay fp32 whatever ``dtype`` is; ``dtype`` is the
compute precision of the forward/backward (autocast; a GradScaler for fp16), so a dtype sweep
changes only that. Evaluation runs as a plain :func:`unlearning.evaluation.evaluate` of the model.

Training goes through the shared loop (:func:`unlearning.training.loop.train`): the attack is a
:class:`TamperMethod` (a plain next-token loss, one phase) and its recipe maps onto the loop's
:class:`~unlearning.training.loop.TrainConfig` (:func:`train_config`), so accumulation, precision,
clipping and checkpoints are the ones every unlearning method uses. Under torchrun it trains
with DDP, or (``parallel: fsdp``) on a model built on the meta device and sharded by FSDP2 exactly
as ``unlearn run``'s (:func:`unlearning.training.fsdp.load_to_train`, ``shard_model``).

The attack's curve goes to ``tamper.json``, written atomically after every evaluation (its format,
reading and summary numbers: :mod:`unlearning.attacks.curves`). An evaluation that fails is a point
with ``"error"`` (and the attack's status ``failed``), never a number. Beside it, ``state.pt``
(the loop's checkpoint: trainable weights, optimizer, scheduler, scaler, data position, RNG) is
replaced atomically at each evaluation step, so ``resume=True`` continues a killed attack.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from unlearning import evaluation  # looked up at call time, so a test can stand in for evaluate
from unlearning.evaluation.settings import EvalSettings
from unlearning.attacks.curves import (CURVE_FORMAT, compact_eval, point_metric, read_curve, reference_acc,
                                      summarize_curve)
from unlearning.attacks.record import new_record, write_record
from unlearning.core.config import param, to_dict
from unlearning.core.errors import ConfigError, NonFiniteLossError
from unlearning.core.faults import fault_point
from unlearning.core.io import atomic_write_json
from unlearning.core.runtime import barrier, is_main_process, resolve_device, resolve_dtype, seed_everything
from unlearning.data.text import BatchStream, TextSource, describe_schedule, load_texts, tokenize
from unlearning.organism.registry import organism_preset
from unlearning.tasks import get_tasks
from unlearning.training import fsdp
from unlearning.training.checkpoint import Checkpointer, load_tensors
from unlearning.training.contract import LossTerms, Method, Phase, StepContext
from unlearning.training.loop import TrainConfig, train
from unlearning.training.optim import OptimizerConfig
from unlearning.training.trainable import LoraSettings, add_lora

log = logging.getLogger(__name__)

DEFAULT_TASKS = ["organism_hazard_cloze"]
GENERAL_TASK = "organism_general_cloze"
# Fields that may change between a killed attack and its resumption without changing the curve.
RESUME_FREE = ("eval.batch_size", "device", "label")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def notebook_optimizer() -> OptimizerConfig:
    """The notebook's SFT recipe (transformers Trainer defaults): AdamW 2e-5, linear decay, no decay."""
    return OptimizerConfig(lr=2e-5, weight_decay=0.0, schedule="linear")


@dataclass
class AttackEvalSettings(EvalSettings):
    """The shared evaluation settings; an attack evaluates the hazard task by default."""
    tasks: list[str] = param(DEFAULT_TASKS, help="evaluated tasks; the first is the primary one (plots, table)")


@dataclass
class AttackConfig:
    """One tamper attack: which model, which text, which fine-tuning recipe, what to evaluate."""
    model: str = param("organism:tiny",
                       help="organism:<preset>[-filtered], a run directory, a local folder or a hub id")
    revision: str | None = None
    data: TextSource = field(default_factory=lambda: TextSource("organism:tamper"))
    examples: int = param(512, min=1, help="unique training examples (the first N of the corpus)")
    seq_len: int = param(256, min=8)
    steps: int = param(110, min=1, help="optimizer steps")
    eval_every: int = param(10, min=1, help="evaluate at step 0, every N steps and at the last step")
    batch_size: int = param(4, min=1, help="examples per micro-batch")
    grad_accum: int = param(1, min=1, help="micro-batches per optimizer step")
    optimizer: OptimizerConfig = field(default_factory=notebook_optimizer)
    max_grad_norm: float = param(1.0, min=0, help="clip the gradient norm; 0 disables clipping")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = param(
        "auto", help="compute precision (autocast); weights and optimizer state stay fp32")
    lora_rank: int = param(0, min=0, help="LoRA rank on all linear layers; 0 = full fine-tuning")
    lora_alpha: float | None = param(None, min=0, help="LoRA alpha (default 2 x rank)")
    eval: AttackEvalSettings = field(default_factory=AttackEvalSettings)
    organism: str | None = param(None, help="organism preset for organism:* data and tasks (default: from the model)")
    seed: int = 0
    device: str = "auto"
    label: str | None = param(None, help="the attack's name in tables and plots")
    parallel: Literal["ddp", "fsdp"] = param(
        "ddp", help="under torchrun: ddp (every rank holds the model) or fsdp (FSDP2: parameters, gradients "
                    "and optimizer state sharded over the ranks, each rank loading only its shards; for a "
                    "model whose full fine-tuning does not fit one GPU). Probe and icl cells train nothing "
                    "and run replicated either way")

    def __post_init__(self) -> None:
        if not self.eval.tasks:
            raise ConfigError("eval.tasks: at least one evaluation task is needed")
        if self.parallel == "fsdp":  # refused here, as the grid is built: before anything is written
            # what the loop's TrainConfig refuses under fsdp, named by the attack's own settings
            if self.dtype == "fp16":
                raise ConfigError("attack.parallel: fsdp with dtype fp16 (--dtype) needs a sharded loss scaler, "
                                  "which is not wired; use --dtype bf16, fp32 or auto, or --parallel ddp")
            if self.optimizer.name == "muon":
                raise ConfigError("attack.parallel: fsdp with optimizer muon (--optimizer) cannot work: Muon "
                                  "orthogonalises whole matrices and FSDP shards them; use --optimizer adamw "
                                  "or --parallel ddp")

    @property
    def tasks(self) -> list[str]:
        """The evaluated tasks (``eval.tasks``); the first is the primary one."""
        return self.eval.tasks


# ----------------------------------------------------------------------------- models and references

def base_model_of(model: str) -> str | None:
    """The model an attack's gap is measured against: the unfiltered organism, or a run's input model."""
    preset = organism_preset(model)
    return f"organism:{preset}" if preset else None


def short_model_name(model: str) -> str:
    return model if model.startswith("organism:") else (Path(model).name or model)


def evaluation_point(model: Any, tokenizer: Any, cfg: AttackConfig, device: torch.device) -> dict[str, Any]:
    """``{"eval": {...}}``, or ``{"error": ...}`` when the evaluation raises or returns a non-number."""
    try:
        tasks = get_tasks(cfg.tasks, organism=cfg.organism or "tiny", **cfg.eval.task_context())
        results = compact_eval(evaluation.evaluate(model, tokenizer, tasks, device=device, **cfg.eval.evaluate_kwargs()))
        for task in cfg.tasks:
            acc = results.get(task, {}).get("acc")
            if not isinstance(acc, (int, float)) or not math.isfinite(acc):
                raise ValueError(f"task {task}: accuracy is {acc!r}")
    except Exception as e:  # recorded in the curve file: a failed evaluation must never look like a number
        log.error("evaluation failed: %s: %s", type(e).__name__, e)
        return {"error": f"{type(e).__name__}: {e}"}
    return {"eval": results}


# ----------------------------------------------------------------------------- the attack

def eval_steps(steps: int, every: int) -> list[int]:
    return sorted({0, steps, *range(every, steps + 1, every)})


def train_config(cfg: AttackConfig) -> TrainConfig:
    """The attack's recipe as the shared loop's settings (one phase of ``cfg.steps`` steps)."""
    return TrainConfig(optimizer=cfg.optimizer, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
                       max_grad_norm=cfg.max_grad_norm, dtype=cfg.dtype, seed=cfg.seed, parallel=cfg.parallel)


def lora_settings(cfg: AttackConfig) -> LoraSettings:
    """``--lora RANK``: adapters on every Linear module of every decoder layer, no dropout."""
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_rank
    return LoraSettings(r=cfg.lora_rank, alpha=alpha, dropout=0.0, layers=None, modules=[])


def lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy over the real (unpadded) tokens."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss


class TamperMethod(Method):
    """The attack as the loop trains it: one phase of next-token loss on the ``attack`` stream,
    every trainable parameter in it; a checkpoint, then ``after_step``, at each evaluation step."""

    def __init__(self, name: str, steps: int, eval_at: list[int],
                 after_step: Callable[[dict[str, Any]], None] | None = None):
        self.name = f"tamper {name}"
        self.steps, self.eval_at, self.after_step = steps, set(eval_at), after_step

    def phases(self) -> list[Phase]:
        return [Phase(index=0, steps=self.steps, name="tamper")]

    def begin_phase(self, model: nn.Module, phase: Phase) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def losses(self, model: nn.Module, batches: dict[str, dict[str, torch.Tensor]],
               ctx: StepContext) -> LossTerms:
        loss = lm_loss(model, batches["attack"]).float()
        return LossTerms(retain={"nll": loss}, logs={"nll_loss": loss.detach()})

    def checkpoint_due(self, global_step: int) -> bool:
        return global_step in self.eval_at

    def on_step(self, record: dict[str, Any]) -> None:
        if self.after_step is not None:
            self.after_step(record)


class _Stop(Exception):
    """Raised from the step hook when an evaluation failed: the attack ends there (status failed)."""


def new_curve(cfg: AttackConfig, name: str, references: dict[str, Any] | None) -> dict[str, Any]:
    return {"format": CURVE_FORMAT, "name": name, "model": cfg.model, "config": to_dict(cfg),
            "status": "running", "error": None, "primary_task": cfg.tasks[0], "references": references or {},
            "train_losses": [], "points": []}


def _dotted(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"eval": {"batch_size": 8}}`` -> ``{"eval.batch_size": 8}``: sections compare key by key,
    so a free key inside one (``eval.batch_size``) can change on resume."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(_dotted(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _check_resumable(curve: dict[str, Any], cfg: AttackConfig, path: Path) -> None:
    old, new = _dotted(curve["config"]), _dotted(to_dict(cfg))
    changed = [k for k in new if k not in RESUME_FREE and old.get(k) != new[k]]
    if changed:
        raise ConfigError(f"{path}: --resume with a different recipe ({', '.join(changed)} changed); "
                          f"resume with the same options or start under another --name")


def finetune_record(curve: dict[str, Any], role: str = "model") -> dict[str, Any]:
    """The curve's ``attack.json`` (:mod:`unlearning.attacks.record`): its summary numbers, headline
    ``max_acc`` (the highest primary-task accuracy after step 0)."""
    task, cfg = curve["primary_task"], curve["config"]
    record = new_record("finetune", curve["name"], curve["model"], role, seed=cfg["seed"], task=task, config=cfg,
                        headline_metric="highest accuracy after step 0")
    summary = summarize_curve(curve["points"], task, reference_acc(curve.get("references") or {}, "base", task))
    record.update(status=curve["status"], error=curve.get("error"))
    record["headline"]["value"] = summary["max_acc"]
    record["result"] = {**summary, "curve": "tamper.json", "data": cfg["data"]["source"],
                        "attack": f"lora{cfg['lora_rank']}" if cfg["lora_rank"] else "full"}
    return record


def run_attack(cfg: AttackConfig, folder: str | Path, *, name: str | None = None,
               references: dict[str, Any] | None = None, resume: bool = False, keep_state: bool = False,
               step0: dict[str, Any] | None = None, role: str = "model",
               on_eval: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one attack into ``folder`` (tamper.json, state.pt, and attack.json when it ends); returns the curve.

    ``step0``: an already computed step-0 evaluation point of the same model and tasks (sweeps
    reuse it). ``on_eval(point)`` is called after each evaluation is on disk. A non-finite loss or
    a failed evaluation ends the attack with status ``failed``. ``role``: the model's place in the
    grid, recorded in attack.json (model, filtered, base).
    """
    curve = _run_attack(cfg, folder, name=name, references=references, resume=resume, keep_state=keep_state,
                        step0=step0, on_eval=on_eval)
    write_record(folder, finetune_record(curve, role))
    return curve


def _run_attack(cfg: AttackConfig, folder: str | Path, *, name: str | None, references: dict[str, Any] | None,
                resume: bool, keep_state: bool, step0: dict[str, Any] | None,
                on_eval: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    curve_path = folder / "tamper.json"
    cfg.organism = cfg.organism or organism_preset(cfg.model)
    name = name or folder.name
    if cfg.organism is None and any(t.startswith("organism_") for t in cfg.tasks):
        raise ConfigError(f"tasks: {', '.join(cfg.tasks)} need an organism, and {cfg.model!r} is not one; "
                          f"set organism (--organism tiny|small) or evaluate other tasks (--tasks)")
    device = resolve_device(cfg.device)
    compute_dtype = resolve_dtype(cfg.dtype, device)
    cfg.dtype = DTYPE_NAMES[compute_dtype]  # "auto" recorded as what it meant on this machine
    curve = new_curve(cfg, name, references)
    if resume and curve_path.exists():
        curve = read_curve(curve_path)
        curve.pop("path", None)
        _check_resumable(curve, cfg, curve_path)
        if curve["status"] == "complete":
            log.info("%s: already complete", name)
            return curve
        curve.update(status="running", error=None)
        if references:
            curve["references"] = references
    elif curve_path.exists() and not resume:
        raise ConfigError(f"{curve_path}: an attack is already recorded here; pass --resume or choose another --name")
    barrier()  # under torchrun: every rank has read the folder before rank 0 writes the curve

    def write_curve() -> None:  # rank 0 writes; under torchrun every rank keeps the same curve
        if is_main_process():
            atomic_write_json(curve_path, curve)

    seed_everything(cfg.seed)
    records = load_texts(cfg.data, cfg.organism)[: cfg.examples]  # data errors before the model loads
    # fp32 master weights whatever the compute precision: autocast casts per operation. Under
    # parallel fsdp (torchrun) the model is built on the meta device, as unlearn run's: the LoRA
    # adapters get their initial values there (add_lora keeps them on the CPU), then it is sharded
    # and each rank loads its shards of the file rank 0 reads (training/fsdp.py).
    model, tokenizer, weights = fsdp.load_to_train(cfg.model, cfg.parallel, revision=cfg.revision,
                                                   dtype=torch.float32, device=device, key="attack.parallel")
    if cfg.lora_rank > 0:
        model = add_lora(model, lora_settings(cfg))
    sharded = weights is not None
    if sharded:
        fsdp.shard_model(model, None, device, weights)  # the attack keeps no originals
    data = tokenize(records, tokenizer, cfg.seq_len, source=cfg.data.source)
    log.info(describe_schedule(f"{name}: tamper data {cfg.data.source}", len(data), cfg.steps,
                               cfg.batch_size, cfg.grad_accum))
    stream = BatchStream(data, cfg.batch_size, seed=cfg.seed)
    checkpointer = Checkpointer(folder)  # state.pt, replaced at each evaluation step by the loop

    start = 0
    if resume and checkpointer.exists():
        start = checkpointer.position().global_step
        log.info("%s: resuming at step %d", name, start)
    # Points after the saved state (written just before a kill) are recomputed identically, and a
    # failed evaluation is tried again.
    curve["points"] = [p for p in curve["points"] if p["step"] <= start and "error" not in p]
    curve["train_losses"] = curve["train_losses"][:start]
    checkpoints = eval_steps(cfg.steps, cfg.eval_every)
    last_lr: float | None = None

    def record(step: int, point: dict[str, Any]) -> bool:
        """Add an evaluation point to the curve on disk (the loop has saved the state of ``step`` first:
        a curve point never refers to a state that is not on disk)."""
        since = [p["step"] for p in curve["points"]]
        prev = max(since) if since else 0
        window = curve["train_losses"][prev:step]
        point = {"step": step, "train_loss": sum(window) / len(window) if window else None,
                 "lr": last_lr if step > 0 else None, **point}
        curve["points"].append(point)
        if "error" in point:
            curve.update(status="failed", error=f"evaluation at step {step} failed: {point['error']}")
        write_curve()
        fault_point("attack_eval")
        acc = point_metric(point, cfg.tasks[0])
        log.info("%s step %d: %s acc %s, train loss %s", name, step, cfg.tasks[0],
                 f"{acc:.4f}" if acc is not None else "FAILED",
                 f"{point['train_loss']:.4f}" if point["train_loss"] is not None else "-")
        if on_eval is not None:
            on_eval(point)
        return "error" not in point

    def after_step(rec: dict[str, Any]) -> None:
        nonlocal last_lr
        curve["train_losses"].append(rec["nll_term"])  # the step's mean over its micro-batches
        last_lr = rec["lr"]  # the rate this step used (first group: Muon's under muon)
        if rec["step"] in checkpoints:
            model.eval()
            ok = record(rec["step"], evaluation_point(model, tokenizer, cfg, device))
            model.train()
            if not ok:
                raise _Stop

    if not curve["points"]:
        if not record(0, dict(step0) if step0 is not None else evaluation_point(model, tokenizer, cfg, device)):
            return curve
    elif curve["points"][-1]["step"] < start:  # the evaluation at the resumption step had failed
        trained = checkpointer.load()["trainable"]  # the weights of that step, to evaluate
        if sharded:
            fsdp.load_full_state(model, trained)
        else:
            load_tensors(model, trained)
        if not record(start, evaluation_point(model, tokenizer, cfg, device)):
            return curve
    model.train()
    method = TamperMethod(name, cfg.steps, checkpoints, after_step)
    try:
        train(model, method, {"attack": stream}, train_config(cfg), device=device, checkpointer=checkpointer,
              resume=start > 0)
    except _Stop:
        return curve
    except NonFiniteLossError as e:
        curve.update(status="failed", error=f"{name}: {e}")
        write_curve()
        log.error("%s", curve["error"])
        return curve
    curve["status"] = "complete"
    write_curve()
    barrier()  # every rank is done with state.pt before it goes
    if not keep_state and is_main_process():
        checkpointer.path.unlink(missing_ok=True)
    return curve
