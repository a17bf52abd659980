"""``unlearn ranks --base A --model B [--output-dir DIR]``: effective / stable rank of B - A.

``--model`` may be a model name (anything ``load_model`` accepts), a LoRA adapter folder, or a
run directory. LoRA updates are read from the adapter itself (``adapter/`` in a run directory),
so merged-and-rounded weights never blur the rank; ``--full-weights`` compares merged weights.

Writes ``ranks.csv`` (module, shape, erank, srank, fro_norm) and adds ``mean_erank`` and
``mean_srank`` to ``results.json`` of the output directory: by default the run directory given
as ``--model``, so reports show them beside the run's accuracies; else ``runs/ranks-<stamp>``.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from unlearning.core.cli import parse_command
from unlearning.core.config import param
from unlearning.core.errors import UserError
from unlearning.core.logs import setup_logging
from unlearning.core.rundir import RunDir, safe_name
from unlearning.core.runtime import resolve_device
from unlearning.model.loading import RUN_SUBFOLDERS, load_weights
from unlearning.reporting import ranks
from unlearning.reporting.tables import format_table

log = logging.getLogger(__name__)


@dataclass
class RanksConfig:
    model: str = param(help="the updated model, LoRA adapter folder, or run directory")
    base: str | None = param(None, help="the model before the update (not needed for a LoRA adapter)")
    output_dir: str | None = param(None, help="where ranks.csv and results.json go (default: the run directory "
                                              "given as --model, else runs/ranks-<time>)")
    full_weights: bool = param(False, help="compare full (merged) weights even when a LoRA adapter is present")
    device: str = param("auto", help="where the SVDs run: auto (GPU when present), cpu, cuda")
    trust_remote_code: bool = param(False, help="let transformers run the model's own code")


def _adapter_folder(model: str) -> Path | None:
    path = Path(model).expanduser()
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    return None


def _is_run_dir(model: str) -> bool:
    path = Path(model).expanduser()
    return path.is_dir() and any((path / sub).is_dir() for sub in RUN_SUBFOLDERS)


def main(argv: list[str]) -> int:
    parsed = parse_command(RanksConfig, argv, prog="unlearn ranks", description=__doc__)
    if parsed is None:
        return 0
    cfg, _ = parsed
    setup_logging()
    device = resolve_device(cfg.device)
    adapter = None if cfg.full_weights else _adapter_folder(cfg.model)
    if adapter is not None:
        if cfg.base:
            log.info("--model is a LoRA adapter: the update is B @ A from %s; --base is not needed", adapter)
        rows = ranks.lora_update_ranks(adapter)
        source = "lora"
    else:
        if not cfg.base:
            raise UserError("--base: required when --model is not a LoRA adapter (give the model before the update)")
        base = load_weights(cfg.base, trust_remote_code=cfg.trust_remote_code)
        model = load_weights(cfg.model, trust_remote_code=cfg.trust_remote_code)
        rows = ranks.weight_update_ranks(base, model, device=device)
        source = "full"

    rd = (RunDir(cfg.output_dir) if cfg.output_dir
          else RunDir(Path(cfg.model).expanduser()) if _is_run_dir(cfg.model)
          else RunDir.for_command(None, None, f"ranks-{safe_name(Path(cfg.model).name)}"))
    csv_path = ranks.write_csv(rows, rd.file("ranks.csv"))
    summary = ranks.summarize(rows)
    results = rd.read_results() or {}
    results.update(mean_erank=summary["mean_erank"], mean_srank=summary["mean_srank"])
    results["ranks"] = {"base": cfg.base, "model": cfg.model, "source": source, "csv": csv_path.name,
                        "n_modules": summary["n_modules"], "n_changed": summary["n_changed"]}
    rd.write_results(results)

    print(format_table(["source", "modules", "changed", "mean_erank", "mean_srank"],
                       [[source, summary["n_modules"], summary["n_changed"], summary["mean_erank"],
                         summary["mean_srank"]]], digits=2))
    print(f"per-module ranks: {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
