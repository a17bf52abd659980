"""``unlearn eval``: evaluate a model on multiple-choice tasks and write a run directory.

    unlearn eval --model organism:tiny --tasks organism_hazard_cloze,organism_general_cloze
    unlearn eval --model EleutherAI/deep-ignorance-unfiltered --tasks wmdp_bio,mmlu --batch-size 16
    unlearn eval --model ./my-model --tasks questions.jsonl:cloze --limit 100 --log-samples

Options are the fields of :class:`EvalConfig` (``--batch-size 16`` or ``--batch_size=16``), or a
YAML file of them with ``--config FILE``. The run directory gets ``config.yaml``,
``results.json`` (task -> metric -> value), ``samples.jsonl`` with ``--log-samples``, and
``log.txt``; a table of the results is printed at the end. An evaluation that raises leaves
``results.json`` as ``{"status": "failed", "error": ...}``; a killed one leaves no results.json,
and evaluating into the same ``--output-dir`` again gives the results an uninterrupted run would.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from unlearning.core.cli import parse_command
from unlearning.core.config import param, to_dict
from unlearning.core.errors import ConfigError, one_line
from unlearning.core.io import atomic_write_text, dumps_json
from unlearning.core.logs import FILE_ONLY
from unlearning.core.rundir import RunDir, check_writable, safe_name
from unlearning.organism.registry import organism_preset
from unlearning.reporting.tables import eval_table as format_table  # the one table formatter
from unlearning.core.runtime import configure_cpu_threads, init_distributed, is_main_process
from unlearning.evaluation import evaluate
from unlearning.tasks import get_tasks
from unlearning.evaluation.settings import EvalSettings
from unlearning.evaluation.tasks import split_task_names
from unlearning.model.loading import load_model

log = logging.getLogger(__name__)

DEFAULT_TASKS = ["organism_hazard_cloze", "organism_benign_bio_cloze", "organism_general_cloze",
                 "organism_hazard", "organism_benign_bio", "organism_general"]


@dataclass(kw_only=True)  # a required model after the shared settings' defaults
class EvalConfig(EvalSettings):
    """``unlearn eval``'s options: the shared evaluation settings, plus the model and the run directory."""
    model: str = param(help="model: organism:tiny[-filtered][@REV], a local HF folder, a run directory, or a hub id")
    revision: str | None = param(None, help="hub revision or organism checkpoint (e.g. step200, early)")
    tasks: list[str] = param(DEFAULT_TASKS, help="comma-separated task names or local .json/.jsonl/.parquet "
                                                 "files (add :cloze for the question format)")
    device: str = param("auto", help="auto, cpu, cuda, cuda:N")
    dtype: str = param("auto", choices=("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16"),
                       help="weights' dtype when loading (auto: bf16 on a GPU, fp32 on CPU)")
    log_samples: bool = param(False, help="write samples.jsonl: one record per question")
    output_dir: str | None = param(None, help="run directory (default runs/eval-<model>-<time>)")
    organism: str | None = param(None, help="organism preset the organism_* tasks read "
                                            "(default: the model's preset for organism:* models, else tiny)")
    config: str | None = param(None, config_file=True,
                               help="a YAML file of these options (command-line options override it)")




def main(argv: list[str]) -> int:
    parsed = parse_command(EvalConfig, argv, prog="unlearn eval", description=__doc__)
    if parsed is None:
        return 0
    cfg, _ = parsed
    if not cfg.model:
        raise ConfigError("model: required; e.g. --model organism:tiny")
    configure_cpu_threads()
    init_distributed()  # under torchrun: each rank scores a shard of the questions; rank 0 writes
    cfg.tasks = split_task_names(cfg.tasks)
    cfg.organism = cfg.organism or organism_preset(cfg.model) or "tiny"
    # A bad task or model fails here, before the run directory exists: no empty runs/eval-* is left.
    tasks = get_tasks(cfg.tasks, organism=cfg.organism, **cfg.task_context())
    run = (RunDir(cfg.output_dir, create=False) if cfg.output_dir
           else RunDir.for_command(None, None, prefix=f"eval-{safe_name(cfg.model)}", create=False))
    check_writable(run.path, "output_dir")
    model, tokenizer = load_model(cfg.model, revision=cfg.revision, dtype=cfg.dtype, device=cfg.device)
    run = RunDir(run.path)
    run.start_logging()
    run.write_config(to_dict(cfg))
    log.info("run directory %s", run.path)

    start = time.time()
    try:
        results = evaluate(model, tokenizer, tasks, log_samples=cfg.log_samples, **cfg.evaluate_kwargs())
    except Exception as e:  # the folder says so; a killed eval leaves none (rerun into it: same results)
        run.fail({}, one_line(e))
        log.error("evaluation failed: %s", one_line(e), exc_info=True, extra={FILE_ONLY: True})
        raise
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
