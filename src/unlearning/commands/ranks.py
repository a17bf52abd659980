"""``unlearn ranks --base A --model B [--output-dir DIR]``: effective / stable rank of B - A.

``--model`` may be a model name (anything ``load_model`` accepts), a LoRA adapter folder, or a
run directory. LoRA updates are read from the adapter itself (``adapter/`` in a run directory),
so merged-and-rounded weights never blur the rank; ``--full-weights`` compares merged weights.

Writes ``ranks.csv`` (module, shape, erank, srank, fro_norm) and adds ``mean_erank`` and
``mean_srank`` to ``results.json`` of the output directory: by default the run directory given
as ``--model``, so reports show them beside the run's accuracies; else ``runs/ranks-<stamp>``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from unlearning.reporting.tables import format_table

log = logging.getLogger(__name__)


def _adapter_folder(model: str) -> Path | None:
    path = Path(model).expanduser()
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    return None


def _is_run_dir(model: str) -> bool:
    from unlearning.model.loading import RUN_SUBFOLDERS
    path = Path(model).expanduser()
    return path.is_dir() and any((path / sub).is_dir() for sub in RUN_SUBFOLDERS)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="unlearn ranks", description="Effective and stable rank of the weight update B - A, per linear "
        "module (LoRA: of B @ A * scaling, from the adapter). Writes ranks.csv and adds mean_erank / mean_srank "
        "to results.json.")
    parser.add_argument("--base", help="the model before the update (not needed for a LoRA adapter)")
    parser.add_argument("--model", required=True, help="the updated model, LoRA adapter folder, or run directory")
    parser.add_argument("--output-dir", help="where ranks.csv and results.json go (default: the run directory "
                        "given as --model, else runs/ranks-<time>)")
    parser.add_argument("--full-weights", action="store_true",
                        help="compare full (merged) weights even when a LoRA adapter is present")
    parser.add_argument("--device", default="auto", help="where the SVDs run: auto (GPU when present), cpu, cuda")
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)

    from unlearning.core.errors import UserError
    from unlearning.core.logs import setup_logging
    from unlearning.core.rundir import RunDir, safe_name
    from unlearning.core.runtime import resolve_device

    setup_logging()
    device = resolve_device(args.device)

    from unlearning.reporting import ranks
    adapter = None if args.full_weights else _adapter_folder(args.model)
    if adapter is not None:
        if args.base:
            log.info("--model is a LoRA adapter: the update is B @ A from %s; --base is not needed", adapter)
        rows = ranks.lora_update_ranks(adapter)
        source = "lora"
    else:
        if not args.base:
            raise UserError("--base: required when --model is not a LoRA adapter (give the model before the update)")
        from unlearning.model.loading import load_weights
        base = load_weights(args.base, trust_remote_code=args.trust_remote_code)
        model = load_weights(args.model, trust_remote_code=args.trust_remote_code)
        rows = ranks.weight_update_ranks(base, model, device=device)
        source = "full"

    rd = (RunDir(args.output_dir) if args.output_dir
          else RunDir(Path(args.model).expanduser()) if _is_run_dir(args.model)
          else RunDir.for_command(None, None, f"ranks-{safe_name(Path(args.model).name)}"))
    csv_path = ranks.write_csv(rows, rd.file("ranks.csv"))
    summary = ranks.summarize(rows)
    results = rd.read_results() or {}
    results.update(mean_erank=summary["mean_erank"], mean_srank=summary["mean_srank"])
    results["ranks"] = {"base": args.base, "model": args.model, "source": source, "csv": csv_path.name,
                        "n_modules": summary["n_modules"], "n_changed": summary["n_changed"]}
    rd.write_results(results)

    print(format_table(["source", "modules", "changed", "mean_erank", "mean_srank"],
                       [[source, summary["n_modules"], summary["n_changed"], summary["mean_erank"],
                         summary["mean_srank"]]], digits=2))
    print(f"per-module ranks: {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
