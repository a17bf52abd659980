"""Run many `unlearn run` configs at once on one GPU and print one table (for device sweeps).

    python benchmarks/parallel_suite.py --preset small --jobs 12 --deadline 480 --out runs/par \
        "muon=configs/organism_small.yaml" \
        "kl=configs/organism_small.yaml --sequential.retain_losses '{l2: 1, kl: 1}'"

The organism models are small, so one run leaves most of an H100/H200 idle: running a dozen
as separate processes uses it. Each entry is NAME=CONFIG followed by overrides (quote each entry;
``@FILE`` reads entries from a file, one per line). The organism is built first (timed). Runs
still going at ``--deadline`` seconds are stopped and reported as such; every finished run's
``results.json`` feeds the table, written to ``<out>/suite.md`` and ``<out>/suite.json``.
Each run's log is ``<out>/<name>.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from unlearning.core.io import atomic_write_json, atomic_write_text  # noqa: E402

COLUMNS = {"hazard": "organism_hazard_cloze", "benign": "organism_benign_bio_cloze",
           "general": "organism_general_cloze"}


def read_entries(args: list[str]) -> list[str]:
    out = []
    for a in args:
        if a.startswith("@"):
            out += [line.strip() for line in Path(a[1:]).read_text().splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
        else:
            out.append(a)
    return out


def summarise(run_dir: Path) -> dict:
    """After-unlearning accuracies, training time and the step-`summary_step` metrics of one run."""
    res = json.loads((run_dir / "results.json").read_text())
    def acc(stage: str, task: str, key: str = "acc") -> float | None:
        return res.get(stage, {}).get(task, {}).get(key)

    row = {k: acc("after", task) for k, task in COLUMNS.items()}
    row["hazard_p"] = acc("after", COLUMNS["hazard"], "correct_prob")
    for stage in ("before", "reference"):
        if stage in res:
            row[stage] = {k: acc(stage, task) for k, task in COLUMNS.items()}
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        lines = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        if lines:
            row["train_s"] = lines[-1].get("time")
            row["last"] = {k: v for k, v in lines[-1].items() if isinstance(v, (int, float))}
    if "train_summary" in res:
        row["train_summary"] = res["train_summary"]
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("entries", nargs="+", help="NAME=CONFIG [--key value ...], or @FILE")
    p.add_argument("--out", default="runs/parallel")
    p.add_argument("--preset", default=None, help="build this organism first and time it")
    p.add_argument("--jobs", type=int, default=8, help="runs at once")
    p.add_argument("--deadline", type=float, default=540, help="seconds from start; later runs are stopped")
    args = p.parse_args()
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    if args.preset:
        from unlearning.organism.build import ensure_organism
        ensure_organism(args.preset)
        timings["organism_build"] = round(time.time() - start, 1)
        print(f"organism {args.preset}: {timings['organism_build']} s", flush=True)

    env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    queue = [shlex.split(e) for e in read_entries(args.entries)]
    running: dict[str, tuple[subprocess.Popen, Any, float]] = {}
    status: dict[str, str] = {}
    while queue or running:
        while queue and len(running) < args.jobs and time.time() - start < args.deadline:
            head, *overrides = queue.pop(0)
            name, _, config = head.partition("=")
            cmd = [sys.executable, "-m", "unlearning.cli", "run", config, *overrides,
                   "--name", name, "--output_dir", str(out)]
            log = open(out / f"{name}.log", "w")
            running[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log, time.time())
        if queue and time.time() - start >= args.deadline:
            for head, *_ in queue:
                status[head.partition("=")[0]] = "not started"
            queue = []
        for name, (proc, log, t0) in list(running.items()):
            code = proc.poll()
            if code is None and time.time() - start >= args.deadline:
                proc.kill()
                proc.wait()
                code = "deadline"
            if code is not None:
                status[name] = "ok" if code == 0 else f"failed ({code})"
                timings[name] = round(time.time() - t0, 1)
                print(f"{name}: {status[name]} in {timings[name]} s", flush=True)
                log.close()
                del running[name]
        time.sleep(1)

    rows = {}
    for name, st in status.items():
        if st == "ok" and (out / name / "results.json").exists():
            rows[name] = summarise(out / name)
        else:
            rows[name] = {"status": st}
    lines = ["| run | hazard | benign-bio | general | hazard correct_prob | train s |", "|---|---|---|---|---|---|"]
    fmt = (lambda v: f"{v:.4f}" if isinstance(v, float) else str(v if v is not None else ""))
    for name, r in rows.items():
        if "status" in r:
            lines.append(f"| {name} | {r['status']} | | | | |")
        else:
            lines.append(f"| {name} | {fmt(r['hazard'])} | {fmt(r['benign'])} | {fmt(r['general'])} | "
                         f"{fmt(r['hazard_p'])} | {fmt(r.get('train_s'))} |")
    table = "\n".join(lines)
    print(table, flush=True)
    atomic_write_text(out / "suite.md", table + "\n")
    atomic_write_json(out / "suite.json", {"timings": timings, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
