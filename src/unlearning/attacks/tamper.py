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

The attack's curve goes to ``tamper.json``, written atomically after every evaluation (its format,
reading and summary numbers: :mod:`unlearning.attacks.curves`). An evaluation that fails is a point
with ``"error"`` (and the attack's status ``failed``), never a number. Beside it, ``state.pt``
(trainable weights, optimizer, scheduler, scaler, data position, RNG) is replaced atomically at
each evaluation, so ``resume=True`` continues a killed attack.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from unlearning.core.config import ConfigError, param, to_dict
from unlearning.data.text import BatchStream, TextSource, describe_schedule, load_texts, tokenize
from unlearning.core.errors import NonFiniteLossError
from unlearning.core.io import atomic_write_json
from unlearning.training.optim import OptimizerConfig, build_optimizer, build_scheduler
from unlearning.evaluation.settings import EvalSettings
from unlearning.core.runtime import autocast, resolve_device, resolve_dtype, seed_everything
from unlearning.attacks.curves import CURVE_FORMAT, compact_eval, point_metric, read_curve

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

    def __post_init__(self) -> None:
        if not self.eval.tasks:
            raise ConfigError("eval.tasks: at least one evaluation task is needed")

    @property
    def tasks(self) -> list[str]:
        """The evaluated tasks (``eval.tasks``); the first is the primary one."""
        return self.eval.tasks


# ----------------------------------------------------------------------------- models and references

def organism_of(model: str) -> str | None:
    """The organism preset behind a model name or a run directory (whose config names its model)."""
    if model.startswith("organism:"):
        return model.split(":", 1)[1].split("@", 1)[0].removesuffix("-filtered")
    config = Path(model) / "config.yaml"
    if config.is_file():
        import yaml
        inner = (yaml.safe_load(config.read_text()) or {}).get("model")
        if isinstance(inner, str) and inner != model:
            return organism_of(inner)
    return None


def base_model_of(model: str) -> str | None:
    """The model an attack's gap is measured against: the unfiltered organism, or a run's input model."""
    preset = organism_of(model)
    return f"organism:{preset}" if preset else None


def short_model_name(model: str) -> str:
    return model if model.startswith("organism:") else (Path(model).name or model)


def evaluation_point(model: Any, tokenizer: Any, cfg: AttackConfig, device: torch.device) -> dict[str, Any]:
    """``{"eval": {...}}``, or ``{"error": ...}`` when the evaluation raises or returns a non-number."""
    from unlearning.evaluation import evaluate, get_tasks
    try:
        tasks = get_tasks(cfg.tasks, organism=cfg.organism or "tiny")
        results = compact_eval(evaluate(model, tokenizer, tasks, device=device, **cfg.eval.evaluate_kwargs()))
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


def apply_lora(model: Any, cfg: AttackConfig) -> Any:
    from peft import LoraConfig, get_peft_model
    alpha = cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_rank
    return get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=alpha, lora_dropout=0.0,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def lm_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy over the real (unpadded) tokens."""
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss


def save_state(path: Path, step: int, model: Any, optimizer: Any, scheduler: Any, scaler: Any,
               stream: BatchStream) -> None:
    """Trainable weights + optimizer/scheduler/scaler + data position + RNG, replaced atomically."""
    state = {"step": step,
             "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else None,
             "stream": stream.state_dict(), "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any, stream: BatchStream) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state["trainable"].items():
            params[n].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    stream.load_state_dict(state["stream"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["step"])


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


def run_attack(cfg: AttackConfig, folder: str | Path, *, name: str | None = None,
               references: dict[str, Any] | None = None, resume: bool = False, keep_state: bool = False,
               step0: dict[str, Any] | None = None,
               on_eval: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run one attack into ``folder`` (tamper.json, state.pt); returns the curve.

    ``step0``: an already computed step-0 evaluation point of the same model and tasks (sweeps
    reuse it). ``on_eval(point)`` is called after each evaluation is on disk. A non-finite loss or
    a failed evaluation ends the attack with status ``failed``.
    """
    from unlearning.model.loading import load_model
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    curve_path, state_path = folder / "tamper.json", folder / "state.pt"
    cfg.organism = cfg.organism or organism_of(cfg.model)
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

    seed_everything(cfg.seed)
    records = load_texts(cfg.data, cfg.organism)[: cfg.examples]  # data errors before the model loads
    # fp32 master weights whatever the compute precision: autocast casts per operation.
    model, tokenizer = load_model(cfg.model, revision=cfg.revision, dtype=torch.float32, device=str(device))
    if cfg.lora_rank > 0:
        model = apply_lora(model, cfg)
    data = tokenize(records, tokenizer, cfg.seq_len, source=cfg.data.source)
    log.info(describe_schedule(f"{name}: tamper data {cfg.data.source}", len(data), cfg.steps,
                               cfg.batch_size, cfg.grad_accum))
    stream = BatchStream(data, cfg.batch_size, seed=cfg.seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = build_optimizer(named, cfg.optimizer)
    scheduler = build_scheduler(optimizer, cfg.steps, cfg.optimizer)
    scaler = torch.amp.GradScaler(device.type) if compute_dtype == torch.float16 else None

    start = 0
    if resume and state_path.exists():
        start = load_state(state_path, model, optimizer, scheduler, scaler, stream)
        log.info("%s: resuming at step %d", name, start)
    # Points after the saved state (written just before a kill) are recomputed identically, and a
    # failed evaluation is tried again.
    curve["points"] = [p for p in curve["points"] if p["step"] <= start and "error" not in p]
    curve["train_losses"] = curve["train_losses"][:start]
    checkpoints = eval_steps(cfg.steps, cfg.eval_every)
    last_lr: float | None = None

    def record(step: int, point: dict[str, Any]) -> bool:
        since = [p["step"] for p in curve["points"]]
        prev = max(since) if since else 0
        window = curve["train_losses"][prev:step]
        point = {"step": step, "train_loss": sum(window) / len(window) if window else None,
                 "lr": last_lr if step > 0 else None, **point}
        if step > 0:  # the state first: a curve point never refers to a state that is not on disk
            save_state(state_path, step, model, optimizer, scheduler, scaler, stream)
        curve["points"].append(point)
        if "error" in point:
            curve.update(status="failed", error=f"evaluation at step {step} failed: {point['error']}")
        atomic_write_json(curve_path, curve)
        acc = point_metric(point, cfg.tasks[0])
        log.info("%s step %d: %s acc %s, train loss %s", name, step, cfg.tasks[0],
                 f"{acc:.4f}" if acc is not None else "FAILED",
                 f"{point['train_loss']:.4f}" if point["train_loss"] is not None else "-")
        if on_eval is not None:
            on_eval(point)
        return "error" not in point

    if not curve["points"]:
        if not record(0, dict(step0) if step0 is not None else evaluation_point(model, tokenizer, cfg, device)):
            return curve
    elif curve["points"][-1]["step"] < start:  # the evaluation at the resumption step had failed
        if not record(start, evaluation_point(model, tokenizer, cfg, device)):
            return curve
    bar = tqdm(total=cfg.steps, initial=start, desc=f"tamper {name}", dynamic_ncols=True)
    model.train()
    try:
        for step in range(start, cfg.steps):
            loss_sum = 0.0
            for _ in range(cfg.grad_accum):
                batch = {k: v.to(device) for k, v in next(stream).items() if k != "hazard_labels"}
                with autocast(device, compute_dtype):
                    loss = lm_loss(model, batch).float() / cfg.grad_accum
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(f"{name}: the training loss is {loss.item()} at step {step + 1}; "
                                             f"lower the learning rate or use bf16/fp32")
                (scaler.scale(loss) if scaler is not None else loss).backward()
                loss_sum += loss.item()
            if scaler is not None:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.max_grad_norm or math.inf)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            last_lr = optimizer.param_groups[0]["lr"]  # the rate this step used (first group: Muon's under muon)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            curve["train_losses"].append(loss_sum)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum:.3g}", refresh=False)
            if step + 1 in checkpoints:
                model.eval()
                ok = record(step + 1, evaluation_point(model, tokenizer, cfg, device))
                model.train()
                if not ok:
                    return curve
    except NonFiniteLossError as e:
        curve.update(status="failed", error=str(e))
        atomic_write_json(curve_path, curve)
        log.error("%s", e)
        return curve
    finally:
        bar.close()
    curve["status"] = "complete"
    atomic_write_json(curve_path, curve)
    if not keep_state:
        state_path.unlink(missing_ok=True)
    return curve
