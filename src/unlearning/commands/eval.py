"""``unlearn eval``: evaluate a model on multiple-choice tasks and write a run directory.

    unlearn eval --model organism:tiny --tasks organism_hazard_cloze,organism_general_cloze
    unlearn eval --model EleutherAI/deep-ignorance-unfiltered --tasks wmdp_bio,mmlu --batch-size 16
    unlearn eval --model ./my-model --tasks questions.jsonl:cloze --limit 100 --log-samples

Options are the fields of :class:`EvalConfig` (``--batch-size 16`` or ``--batch_size=16``), or a
YAML file of them with ``--config FILE``. The run directory gets ``config.yaml``,
``results.json`` (task -> metric -> value), ``samples.jsonl`` with ``--log-samples``, and
``log.txt``; a table of the results is printed at the end.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearning.core.config import load_config, param, to_dict
from unlearning.core.errors import ConfigError, ModelNotFoundError
from unlearning.core.io import atomic_write_text, dumps_json
from unlearning.core.rundir import RunDir, safe_name
from unlearning.organism.registry import organism_preset
from unlearning.reporting.tables import eval_table as format_table  # the one table formatter
from unlearning.core.runtime import configure_cpu_threads, init_distributed, is_main_process

log = logging.getLogger(__name__)

DEFAULT_TASKS = ["organism_hazard_cloze", "organism_benign_bio_cloze", "organism_general_cloze",
                 "organism_hazard", "organism_benign_bio", "organism_general"]


@dataclass
class EvalConfig:
    model: str = param(help="model: organism:tiny[-filtered][@REV], a local HF folder, a run directory, or a hub id")
    revision: str | None = param(None, help="hub revision or organism checkpoint (e.g. step200, early)")
    tasks: list[str] = param(DEFAULT_TASKS, help="comma-separated task names or local .json/.jsonl/.parquet "
                                                 "files (add :cloze for the question format)")
    batch_size: int = param(32, min=1, help="questions' requests per forward pass")
    device: str = param("auto", help="auto, cpu, cuda, cuda:N")
    dtype: str = param("auto", choices=("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"),
                       help="weights' dtype when loading (auto: bf16 on a GPU, fp32 on CPU)")
    limit: int | None = param(None, min=1, help="first N questions of each task (for quick checks)")
    log_samples: bool = param(False, help="write samples.jsonl: one record per question")
    output_dir: str | None = param(None, help="run directory (default runs/eval-<model>-<time>)")
    organism: str | None = param(None, help="organism preset the organism_* tasks read "
                                            "(default: the model's preset for organism:* models, else tiny)")
    add_bos_token: bool | None = param(None, help="prepend BOS (unset: lm-eval's default for the tokenizer)")
    max_length: int | None = param(None, min=2, help="context limit in tokens (unset: the model's)")
    mixed_precision: bool | None = param(None, help="bf16 autocast (unset: on for an fp32 model on a GPU)")


def load_model_and_tokenizer(name: str, revision: str | None, dtype: str, device: str) -> tuple[Any, Any]:
    """``unlearning.model.loading.load_model`` when present; until then, a local Hugging Face folder."""
    if importlib.util.find_spec("unlearning.model.loading") is not None:
        from unlearning.model.loading import load_model
        return load_model(name, revision=revision, dtype=dtype, device=device)
    return _load_local_folder(name, dtype, device)


def _load_local_folder(name: str, dtype: str, device: str) -> tuple[Any, Any]:
    import transformers

    from unlearning.core.runtime import resolve_device, resolve_dtype

    folder = Path(name).expanduser()
    if (folder / "model").is_dir():  # a run directory
        folder = folder / "model"
    if not (folder / "config.json").exists():
        raise ModelNotFoundError(f"model: {name!r} is not a local Hugging Face folder (no config.json), and "
                                 "hub ids / organism:* names need unlearning.model.loading, which is not installed yet")
    dev = resolve_device(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=resolve_dtype(dtype, dev))
    return model.to(dev), tokenizer


def usage() -> str:
    lines = ["usage: unlearn eval --model MODEL [--tasks a,b,c] [options]", "", __doc__.strip().split("\n\n")[1], "",
             "options:"]
    hints = typing.get_type_hints(EvalConfig)
    for f in dataclasses.fields(EvalConfig):
        default = "" if f.default is dataclasses.MISSING else f" (default: {f.default})"
        if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f" (default: {','.join(f.default_factory())})"  # type: ignore[misc]
        kind = getattr(hints[f.name], "__name__", str(hints[f.name]))
        lines.append(f"  --{f.name.replace('_', '-'):<17} {f.metadata.get('help', '')} [{kind}]{default}")
    lines.append("  --config FILE       a YAML file of these options (command-line options override it)")
    return "\n".join(lines)


def _split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    rest, path, i = [], None, 0
    while i < len(argv):
        if argv[i] == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config: needs a file path")
            path, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            path, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return path, rest


def main(argv: list[str]) -> int:
    if any(a in ("-h", "--help") for a in argv):
        print(usage())
        return 0
    config_path, overrides = _split_config_flag(list(argv))
    cfg = load_config(EvalConfig, config_path, overrides)
    if not cfg.model:
        raise ConfigError("model: required; e.g. --model organism:tiny")
    from unlearning.evaluation import evaluate
    from unlearning.tasks import get_tasks
    from unlearning.evaluation.tasks import split_task_names

    configure_cpu_threads()
    init_distributed()  # under torchrun: each rank scores a shard of the questions; rank 0 writes
    cfg.tasks = split_task_names(cfg.tasks)
    cfg.organism = cfg.organism or organism_preset(cfg.model) or "tiny"
    run = (RunDir(cfg.output_dir) if cfg.output_dir
           else RunDir.for_command(None, None, prefix=f"eval-{safe_name(cfg.model)}"))
    run.start_logging()
    run.write_config(to_dict(cfg))
    log.info("run directory %s", run.path)

    tasks = get_tasks(cfg.tasks, organism=cfg.organism)  # fail on a bad task before loading a model
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.revision, cfg.dtype, cfg.device)
    start = time.time()
    results = evaluate(model, tokenizer, tasks, batch_size=cfg.batch_size, log_samples=cfg.log_samples,
                       limit=cfg.limit, add_bos_token=cfg.add_bos_token, max_length=cfg.max_length,
                       mixed_precision=cfg.mixed_precision)
    seconds = time.time() - start
    samples = [rec for r in results.values() for rec in r.pop("samples", [])]
    if cfg.log_samples and is_main_process():
        atomic_write_text(run.file("samples.jsonl"), "".join(dumps_json(s, indent=None) + "\n" for s in samples))
    run.write_results(results)
    run.metrics_logger().log({"eval_seconds": round(seconds, 3),
                              "questions": sum(r["n"] for r in results.values() if "subtasks" not in r)})
    log.info("evaluated in %.1f s; results in %s", seconds, run.results_path)
    if is_main_process():
        print(format_table(results))
    return 0
