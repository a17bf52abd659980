"""Run several `unlearn run` configs back to back and print one table with timings (for GPU runs).

    python benchmarks/run_suite.py --out runs/suite \
        "default=configs/organism_small.yaml" \
        "rc20=configs/organism_small.yaml --sequential.remove_coef 20"

Each entry is NAME=CONFIG followed by optional overrides. The organism is built (or reused) first,
and its build time is reported separately. Writes <out>/suite.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from unlearning.core.io import atomic_write_json  # noqa: E402
from unlearning.core.logs import setup_logging  # noqa: E402
from unlearning.reporting.report import report_table  # noqa: E402
from unlearning.runner import load_run_config, run  # noqa: E402

COLUMNS = ["organism_hazard_cloze:acc", "organism_benign_bio_cloze:acc", "organism_general_cloze:acc",
           "organism_hazard_cloze:correct_prob"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("entries", nargs="+", help='NAME=CONFIG [--key value ...] (quote each entry)')
    p.add_argument("--out", default="runs/suite")
    p.add_argument("--preset", default=None, help="build this organism first and time it")
    args = p.parse_args()
    setup_logging()
    timings: dict[str, float] = {}
    if args.preset:
        from unlearning.organism.build import ensure_organism
        t = time.time()
        ensure_organism(args.preset)
        timings["organism_build"] = round(time.time() - t, 1)
    dirs = []
    for entry in args.entries:
        head, *overrides = shlex.split(entry)
        name, _, config = head.partition("=")
        cfg = load_run_config(config, [*overrides, "--name", name, "--output_dir", args.out])
        t = time.time()
        try:
            run(cfg)
        except Exception as e:  # keep going: one failed variant should not lose the others
            print(f"{name}: FAILED: {type(e).__name__}: {e}", flush=True)
            timings[name] = -1.0
            continue
        timings[name] = round(time.time() - t, 1)
        dirs.append(Path(args.out) / name)
        metrics = [json.loads(line) for line in (Path(args.out) / name / "metrics.jsonl").read_text().splitlines()]
        train_s = metrics[-1].get("time") if metrics else None
        timings[f"{name}.train_s"] = train_s
        print(report_table(dirs, COLUMNS), flush=True)
    atomic_write_json(Path(args.out) / "suite.json", {"timings": timings, "runs": [str(d) for d in dirs]})
    print(json.dumps(timings, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
