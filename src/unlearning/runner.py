"""`unlearn run`: load a model and data, unlearn with a method, save, evaluate before and after.

The run config is one dataclass (:class:`RunConfig`) with a section per concern and one per
method; only the selected method's section is used, but every section given is validated.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from unlearning.core.config import ConfigError, from_dict, load_config, param, to_dict
from unlearning.core.io import match_umask
from unlearning.data.text import BatchStream, TextSource, TokenizedData, describe_schedule, load_texts, mix, tokenize
from unlearning.methods import METHODS, method_module
from unlearning.training.loop import Checkpointer, TrainConfig, train
from unlearning.core.rundir import RunDir, safe_name
from unlearning.core.runtime import (barrier, init_distributed, is_main_process, resolve_device, resolve_dtype,
                                seed_everything)

log = logging.getLogger(__name__)

ORGANISM_TASKS = ["organism_hazard_cloze", "organism_benign_bio_cloze", "organism_general_cloze"]


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
class EvalConfig:
    tasks: list[str] = param(ORGANISM_TASKS, help="tasks for before/after evaluation")
    batch_size: int = param(32, min=1)
    limit: int | None = param(None, min=1, help="questions per task (for quick checks)")
    before: bool = param(True, help="also evaluate the model before unlearning")
    reference: str | None = param("auto", help="a reference model row: auto = the organism's filtered twin")


@dataclass
class SaveConfig:
    model: bool = param(True, help="save the unlearned model (merged weights) under the run directory")
    adapter: bool = param(True, help="for LoRA, also save the adapter")
    models_dir: str | None = param(None, help="also copy the merged model to <models_dir>/<method's name>")


@dataclass
class LoggingConfig:
    level: str = param("INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    wandb_project: str | None = None
    tensorboard: bool = False


@dataclass
class RunConfig:
    name: str | None = param(None, help="run directory name under output_dir (default: method and time)")
    output_dir: str = "runs"
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

    def method_config(self) -> Any:
        return from_dict(method_module(self.method).Config, getattr(self, self.method), prefix=f"{self.method}.")


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    cfg = load_config(RunConfig, path, overrides)
    for name in METHODS:  # every section given must be valid, not only the selected one
        if getattr(cfg, name):
            from_dict(method_module(name).Config, getattr(cfg, name), prefix=f"{name}.")
    cfg.method_config()
    return cfg


def resolved_model_name(name: str) -> str:
    if name == "auto":
        return "organism:small" if torch.cuda.is_available() else "organism:tiny"
    return name


def organism_preset(model_name: str) -> str | None:
    """``organism:small-filtered@step200`` -> ``small``; None for other models."""
    if not model_name.startswith("organism:"):
        return None
    return model_name.split(":", 1)[1].split("@", 1)[0].removesuffix("-filtered")


def prepare_data(cfg: RunConfig, tokenizer: Any, organism: str | None) -> dict[str, TokenizedData]:
    d = cfg.data
    out = {}
    for name in ("forget", "retain"):
        src: TextSource = getattr(d, name)
        records = load_texts(src, organism)[: d.num_train_examples]
        out[name] = tokenize(records, tokenizer, d.seq_len, pack=d.pack, source=src.source)
    if d.extra_retain is not None and d.extra_retain_ratio > 0:
        extra = tokenize(load_texts(d.extra_retain, organism), tokenizer, d.seq_len, pack=d.pack,
                         source=d.extra_retain.source)
        out["retain"] = mix(out["retain"], extra, d.extra_retain_ratio, seed=cfg.train.seed)
    return out


def evaluate_model(model: Any, tokenizer: Any, cfg: RunConfig, organism: str | None,
                   device: torch.device) -> dict[str, Any]:
    from unlearning.evaluation import evaluate, get_tasks
    tasks = get_tasks(cfg.eval.tasks, organism=organism or "tiny")
    return evaluate(model, tokenizer, tasks, batch_size=cfg.eval.batch_size, device=device, limit=cfg.eval.limit)


def save_model(model: Any, tokenizer: Any, folder: Path, adapter_folder: Path | None) -> Any:
    """Save (adapter and) merged weights atomically; returns the merged model."""
    def atomic_save(obj: Any, dest: Path) -> None:
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        obj.save_pretrained(tmp)
        if obj is not tokenizer:
            tokenizer.save_pretrained(tmp)
        match_umask(tmp)  # safetensors writes the weights 0600 whatever the umask
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)

    from peft import PeftModel
    if isinstance(model, PeftModel):
        if adapter_folder is not None:
            atomic_save(model, adapter_folder)
        model = model.merge_and_unload()
    atomic_save(model, folder)
    return model


def run(cfg: RunConfig, *, resume: bool = False) -> dict[str, Any]:
    from unlearning.model.loading import load_model
    init_distributed()
    model_name = resolved_model_name(cfg.model)
    organism = organism_preset(model_name)
    mcfg = cfg.method_config()
    name = cfg.name or safe_name(f"{cfg.method}-{model_name}")
    rundir = RunDir(Path(cfg.output_dir) / name)
    if rundir.results_path.exists() and not resume:
        raise ConfigError(f"name: the run directory {rundir.path} already holds results; choose another name "
                          f"or pass --resume to continue it")
    rundir.start_logging(cfg.logging.level)
    rundir.write_config({**to_dict(cfg), "model": model_name, cfg.method: to_dict(mcfg)})
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(model_name, revision=cfg.revision, dtype=resolve_dtype(cfg.model_dtype, device)
                                  if cfg.model_dtype != "auto" else "auto", device=str(device))
    results: dict[str, Any] = (rundir.read_results() or {}) if resume else {}
    results.update({"model": model_name, "method": cfg.method})
    if cfg.eval.before and "before" not in results and is_main_process():
        log.info("evaluating the model before unlearning")
        results["before"] = evaluate_model(model, tokenizer, cfg, organism, device)
        rundir.write_results(results)

    data = prepare_data(cfg, tokenizer, organism)
    module = method_module(cfg.method)
    model, method = module.build(model, tokenizer, cfg, mcfg, data, device)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    steps = sum(p.steps for p in method.phases())
    log.info(describe_schedule("forget data", len(data["forget"]), steps, cfg.train.batch_size, cfg.train.grad_accum))
    log.info(describe_schedule("retain data", len(data["retain"]), steps, cfg.train.batch_size, cfg.train.grad_accum))
    streams = {k: BatchStream(v, cfg.train.batch_size, seed=cfg.train.seed + i) for i, (k, v) in enumerate(data.items())}
    metrics = rundir.metrics_logger(wandb_project=cfg.logging.wandb_project, run_name=name, config=to_dict(cfg),
                                    tensorboard_dir=rundir.file("tensorboard") if cfg.logging.tensorboard else None)
    model.train()
    train(model, method, streams, cfg.train, device=device, metrics=metrics,
          checkpointer=Checkpointer(rundir.file("checkpoint")), resume=resume,
          on_step=getattr(method, "on_step", None))
    metrics.close()
    if getattr(method, "train_summary", None):  # a method's training metrics at its summary step
        results["train_summary"] = method.train_summary
    model.eval()
    barrier()
    if is_main_process():
        if cfg.save.model:
            model = save_model(model, tokenizer, rundir.file("model"),
                               rundir.file("adapter") if cfg.save.adapter else None)
            if cfg.save.models_dir:
                dest = Path(cfg.save.models_dir) / getattr(method, "save_name", name)
                shutil.copytree(rundir.file("model"), dest, dirs_exist_ok=True)
                if cfg.save.adapter and rundir.file("adapter").exists():
                    shutil.copytree(rundir.file("adapter"), dest / "adapter", dirs_exist_ok=True)
                results["models_dir"] = str(dest)
        results["after"] = evaluate_model(model, tokenizer, cfg, organism, device)
        rundir.write_results(results)
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
        rundir.write_results(results)
    barrier()
    return results
