"""`unlearn run`: load a model and data, unlearn with a method, save, evaluate before and after.

The run config is one dataclass (:class:`RunConfig`) with a section per concern and one per
method; only the selected method's section is used, but every section given is validated.

A run first passes :func:`unlearning.preflight.preflight` (model name and depth, layer specs, data
files, task names, the run name), which writes nothing; only then is the run directory made.
results.json then carries the run's ``status`` (running / failed / complete, see
:mod:`unlearning.core.rundir`): a failed run records its one-line error (log.txt the traceback)
and is started afresh by the next run of its name; a complete or unfinished one is kept unless
``--resume`` or ``--overwrite`` says otherwise.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unlearning.core.config import from_dict, load_config, param, to_dict
from unlearning.core.errors import one_line
from unlearning.core.faults import fault_point
from unlearning.core.io import match_umask
from unlearning.core.logs import FILE_ONLY
from unlearning.core.paths import runs_root
from unlearning.core.rundir import RunDir
from unlearning.core.runtime import (barrier, init_distributed, is_main_process, resolve_device, resolve_dtype,
                                     seed_everything)
from unlearning.data.text import BatchStream, TextSource, TokenizedData, describe_schedule, load_texts, mix, tokenize
from unlearning.evaluation import evaluate
from unlearning.evaluation.settings import ORGANISM_TASKS, EvalSettings
from unlearning.methods import METHODS, BuildContext, method_module
from unlearning.model.loading import load_model
from unlearning.model.originals import original_model
from unlearning.reporting.report import write_training_curves
from unlearning.preflight import Plan, organism_preset, preflight, resolved_model_name
from unlearning.tasks import get_tasks
from unlearning.training import fsdp
from unlearning.training.loop import Checkpointer, TrainConfig, train

__all__ = ["RunConfig", "load_run_config", "run", "preflight", "resolved_model_name", "organism_preset"]

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    forget: TextSource = field(default_factory=lambda: TextSource("organism:forget"))
    retain: TextSource = field(default_factory=lambda: TextSource("organism:retain"))
    extra_retain: TextSource | None = param(None, help="extra retain data, e.g. organism:chat (UltraChat stand-in)")
    extra_retain_ratio: float = param(0.0, min=0, max=0.95, help="share of retain rows drawn from extra_retain")
    num_train_examples: int = param(1024, min=1, help="unique forget (and retain) examples")
    seq_len: int = param(256, min=8)
    pack: bool = param(False, help="pack documents end to end instead of one example per row")


@dataclass
class EvalConfig(EvalSettings):
    """The shared evaluation settings, plus what only a run has: the before row and a reference."""
    tasks: list[str] = param(ORGANISM_TASKS, help="tasks for before/after evaluation")
    before: bool = param(True, help="also evaluate the model before unlearning")
    reference: str | None = param("auto", help="a reference model row: auto = the organism's filtered twin")


@dataclass
class SaveConfig:
    model: bool = param(True, help="save the unlearned model (merged weights) under the run directory")
    adapter: bool = param(True, help="for LoRA, also save the adapter")
    models_dir: str | None = param(None, help="also copy the merged model to <models_dir>/<method's name>")
    keep_checkpoint: bool = param(False, help="keep the training checkpoint after the run completes "
                                              "(it is removed by default: the saved model supersedes it)")


@dataclass
class LoggingConfig:
    level: str = param("INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    wandb_project: str | None = None
    tensorboard: bool = False


@dataclass
class RunConfig:
    name: str | None = param(None, help="run directory name under output_dir (default: method and time)")
    output_dir: str = param(default_factory=lambda: str(runs_root()),
                            help="parent of the run directory (default $UNLEARNING_RUNS or runs)")
    model: str = param("auto", help="organism:tiny|small[-filtered], a local folder or a hub id; "
                                    "auto = organism:small with a GPU, organism:tiny without")
    revision: str | None = None
    model_dtype: str = param("fp32", choices=["auto", "fp32", "bf16", "fp16"],
                             help="precision the weights are held in (compute precision is train.dtype)")
    device: str = "auto"
    method: str = param("sequential", choices=list(METHODS))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    save: SaveConfig = field(default_factory=SaveConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    # One section per method, validated against that method's Config dataclass.
    sequential: dict[str, Any] = field(default_factory=dict)
    checkpoint_transfer: dict[str, Any] = field(default_factory=dict)
    circuit_breaker: dict[str, Any] = field(default_factory=dict)
    rmu: dict[str, Any] = field(default_factory=dict)
    undo: dict[str, Any] = field(default_factory=dict)
    tar: dict[str, Any] = field(default_factory=dict)

    def method_config(self) -> Any:
        return from_dict(method_module(self.method).Config, getattr(self, self.method), prefix=f"{self.method}.")


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    cfg = load_config(RunConfig, path, overrides)
    for name in METHODS:  # every section given must be valid, not only the selected one
        if getattr(cfg, name):
            from_dict(method_module(name).Config, getattr(cfg, name), prefix=f"{name}.")
    cfg.method_config()
    return cfg


def prepare_data(cfg: RunConfig, tokenizer: Any, organism: str | None,
                 texts: dict[str, list[dict[str, Any]]] | None = None) -> dict[str, TokenizedData]:
    """Tokenized corpora; ``texts``: records preflight already read (local files), by corpus."""
    d = cfg.data
    texts = texts or {}

    def records(name: str, src: TextSource) -> list[dict[str, Any]]:
        return texts[name] if name in texts else load_texts(src, organism)

    out = {}
    for name in ("forget", "retain"):
        src: TextSource = getattr(d, name)
        out[name] = tokenize(records(name, src)[: d.num_train_examples], tokenizer, d.seq_len, pack=d.pack,
                             source=src.source)
    if d.extra_retain is not None and d.extra_retain_ratio > 0:
        extra = tokenize(records("extra_retain", d.extra_retain), tokenizer, d.seq_len, pack=d.pack,
                         source=d.extra_retain.source)
        out["retain"] = mix(out["retain"], extra, d.extra_retain_ratio, seed=cfg.train.seed)
    return out


def evaluate_model(model: Any, tokenizer: Any, cfg: RunConfig, organism: str | None,
                   device: torch.device) -> dict[str, Any]:
    tasks = get_tasks(cfg.eval.tasks, organism=organism or "tiny", **cfg.eval.task_context())
    return evaluate(model, tokenizer, tasks, device=device, **cfg.eval.evaluate_kwargs())


def save_model(model: Any, tokenizer: Any, folder: Path, adapter_folder: Path | None, *, write: bool = True) -> Any:
    """Save (adapter and) merged weights atomically; returns the merged model.

    ``write=False`` (ranks other than 0 under torchrun) only merges, so every rank evaluates the
    same weights rank 0 saved. A model sharded by FSDP2 is gathered into full tensors on rank 0
    (every rank takes part) and saved from them; it is returned as it is, adapters unmerged (the
    merged weights exist only on rank 0's CPU), and evaluated sharded."""
    def atomic_save(obj: Any, dest: Path, state_dict: dict[str, Any] | None = None) -> None:
        if not write:
            return
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        obj.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
        if obj is not tokenizer:
            tokenizer.save_pretrained(tmp)
        match_umask(tmp)  # safetensors writes the weights 0600 whatever the umask
        fault_point("save_model")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)

    from peft import PeftModel  # lazy: peft imports transformers (seconds); preflight errors come sooner
    if fsdp.is_sharded(model):
        inner = model.get_base_model() if isinstance(model, PeftModel) else model
        merged, adapter = fsdp.merged_lora_state(model)  # collectives: before any rank returns
        if isinstance(model, PeftModel) and adapter_folder is not None:
            atomic_save(model, adapter_folder, {f"base_model.model.{k}": v for k, v in adapter.items()})
        atomic_save(inner, folder, merged)
        return model
    if isinstance(model, PeftModel):
        if adapter_folder is not None:
            atomic_save(model, adapter_folder)
        model = model.merge_and_unload()
    atomic_save(model, folder)
    return model


def run(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, force: bool = False) -> dict[str, Any]:
    """Unlearn per ``cfg`` in ``<output_dir>/<name>``; returns results.json's contents.

    ``resume``: continue an unfinished (or failed, checkpointed) run of this name, or return a
    complete one's results; ``overwrite``: start afresh over whatever run is there; ``force``:
    resume even though the config differs from the saved one (see preflight.FREE_ON_RESUME for
    the keys that may differ anyway).
    """
    init_distributed()
    plan = preflight(cfg, resume=resume, overwrite=overwrite, force=force)
    barrier()  # under torchrun: every rank has looked at the run folder before rank 0 writes to it
    if plan.mode == "complete":
        log.info("%s is complete; --resume has nothing to do (use --overwrite to run it again)", plan.rundir)
        return RunDir(plan.rundir, create=False).read_results() or {}
    rundir = RunDir(plan.rundir, root=cfg.output_dir)  # the store of output_dir records it (a sweep row too)
    if plan.mode == "replace":
        rundir.reset()
    barrier()
    with rundir.logging(cfg.logging.level):
        log.info("run %s (%s)", rundir.path, {"fresh": "new", "replace": "the earlier run there was removed; "
                                              "starting afresh", "resume": "resuming"}[plan.mode])
        for change in plan.changes:
            log.warning("--force: resuming with %s", change)
        rundir.write_config(plan.record)
        results = rundir.begin((rundir.read_results() or {}) if plan.mode == "resume" else {})
        try:
            return _unlearn(cfg, plan, rundir, results)
        except Exception as e:
            rundir.fail(results, one_line(e))
            log.error("run failed: %s", one_line(e), exc_info=True, extra={FILE_ONLY: True})
            raise
        except KeyboardInterrupt:
            log.warning("interrupted: %s is unfinished; continue it with --resume", rundir.path)
            raise


def _draw_training_curves(rundir: RunDir) -> None:
    """training.png beside metrics.jsonl; a plot is a convenience, so a failure is logged, never raised."""
    try:
        write_training_curves(rundir.path)
    except Exception as e:  # noqa: BLE001 - whatever matplotlib raises, the run's results matter more
        log.warning("training curves not drawn (%s); the run goes on", one_line(e))


def _evaluate_before(model: Any, tokenizer: Any, cfg: RunConfig, organism: str | None, device: torch.device,
                     rundir: RunDir, results: dict[str, Any]) -> None:
    log.info("evaluating the model before unlearning")
    results["before"] = evaluate_model(model, tokenizer, cfg, organism, device)
    rundir.write_results(results)


def _unlearn(cfg: RunConfig, plan: Plan, rundir: RunDir, results: dict[str, Any]) -> dict[str, Any]:
    """Load, evaluate before, train, save, evaluate after; ``results`` is updated (and written) as it goes."""
    model_name, organism, mcfg, resume = plan.model_name, plan.organism, plan.method_config, plan.mode == "resume"
    name = cfg.name or rundir.path.name
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.model_dtype, device) if cfg.model_dtype != "auto" else "auto"
    # Under FSDP no rank holds the whole model: it is built on the meta device, set up by the
    # method, sharded, and only then materialised and loaded (training/fsdp.py).
    model, tokenizer, weights = fsdp.load_to_train(model_name, cfg.train.parallel, revision=cfg.revision,
                                                   dtype=dtype, device=device)
    sharded = weights is not None
    results.update({"model": model_name, "method": cfg.method})
    # Evaluations run on every rank: under torchrun each scores a shard (evaluation/parallel.py);
    # rank 0 writes. A sharded model is evaluated once it is loaded, below.
    if cfg.eval.before and "before" not in results and not sharded:
        _evaluate_before(model, tokenizer, cfg, organism, device, rundir, results)

    data = prepare_data(cfg, tokenizer, organism, plan.texts)
    module = method_module(cfg.method)
    model, method = module.build(model, BuildContext(model_name=model_name, tokenizer=tokenizer, data=data,
                                                     device=device, train=cfg.train, seed=cfg.train.seed,
                                                     model_dtype=cfg.model_dtype), mcfg)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if sharded:
        # after the method's set-up (LoRA adapters, the originals to keep), before any training
        fsdp.shard_model(model, getattr(method, "originals", None), device, weights)
        if cfg.eval.before and "before" not in results:
            from peft import PeftModel  # lazy, as in save_model
            # the original model: LoRA adapters off (lora.init_b_std moves them off zero already)
            with original_model(model) if isinstance(model, PeftModel) else contextlib.nullcontext():
                _evaluate_before(model, tokenizer, cfg, organism, device, rundir, results)
    steps = sum(p.steps for p in method.phases())
    log.info(describe_schedule("forget data", len(data["forget"]), steps, cfg.train.batch_size, cfg.train.grad_accum))
    log.info(describe_schedule("retain data", len(data["retain"]), steps, cfg.train.batch_size, cfg.train.grad_accum))
    streams = {k: BatchStream(v, cfg.train.batch_size, seed=cfg.train.seed + i) for i, (k, v) in enumerate(data.items())}
    metrics = rundir.metrics_logger(wandb_project=cfg.logging.wandb_project, run_name=name, config=to_dict(cfg),
                                    tensorboard_dir=rundir.file("tensorboard") if cfg.logging.tensorboard else None)
    model.train()
    train(model, method, streams, cfg.train, device=device, metrics=metrics,
          checkpointer=Checkpointer(rundir.checkpoint_path), resume=resume)
    metrics.close()
    if is_main_process():
        _draw_training_curves(rundir)
    if method.train_summary:  # a method's training metrics at its summary step
        results["train_summary"] = method.train_summary
    model.eval()
    barrier()
    if cfg.save.model:
        model = save_model(model, tokenizer, rundir.file("model"),
                           rundir.file("adapter") if cfg.save.adapter else None, write=is_main_process())
        if cfg.save.models_dir:
            dest = Path(cfg.save.models_dir) / (method.save_name or name)
            if is_main_process():
                shutil.copytree(rundir.file("model"), dest, dirs_exist_ok=True)
                if cfg.save.adapter and rundir.file("adapter").exists():
                    shutil.copytree(rundir.file("adapter"), dest / "adapter", dirs_exist_ok=True)
            results["models_dir"] = str(dest)
    results["after"] = evaluate_model(model, tokenizer, cfg, organism, device)
    rundir.write_results(results)
    fault_point("final_eval")
    reference = cfg.eval.reference
    if reference == "auto":
        reference = f"organism:{organism}-filtered" if organism else None
    if reference and "reference" not in results:
        del model
        gc.collect()
        ref_model, ref_tok = load_model(reference, device=str(device))
        results["reference"] = evaluate_model(ref_model, ref_tok, cfg, organism, device)
        results["reference_model"] = reference
    results["run_dir"] = str(rundir.path)
    rundir.complete(results)
    if not cfg.save.keep_checkpoint and is_main_process():  # after "complete": a kill in between leaves it
        shutil.rmtree(rundir.checkpoint_path, ignore_errors=True)
    barrier()
    return results
