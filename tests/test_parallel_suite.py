"""benchmarks/parallel_suite.py, the device sweep runner: runs entries as separate processes, reports
each run's after-unlearning accuracies, and keeps going past a failed entry."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "parallel_suite.py"
QUICK = "--eval.before false --eval.reference null --data.num_train_examples 32"


def test_parallel_suite_reports_finished_and_failed_runs(tiny_organism, tmp_path):
    entries = tmp_path / "entries.txt"
    entries.write_text(
        "# a comment line\n"
        f"seq=configs/organism_tiny.yaml --sequential.steps_per_layer 1 "
        f"--sequential.retain_losses '{{l2: 1, kl: 1}}' {QUICK}\n"
        f"bad=configs/organism_tiny.yaml --sequential.retain_losses '{{l2:1}}' {QUICK}\n")
    out = tmp_path / "suite"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--jobs", "2", "--deadline", "600", "--out", str(out),
                           f"@{entries}"], cwd=SCRIPT.parents[1], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    suite = json.loads((out / "suite.json").read_text())
    seq, bad = suite["rows"]["seq"], suite["rows"]["bad"]
    assert 0.0 <= seq["hazard"] <= 1.0 and 0.0 <= seq["general"] <= 1.0 and seq["train_s"] > 0
    after = json.loads((out / "seq" / "results.json").read_text())["after"]
    assert seq["hazard"] == after["organism_hazard_cloze"]["acc"]
    assert bad == {"status": "failed (2)"}
    assert "space after each colon" in (out / "bad.log").read_text()  # the YAML hint reaches the user
    assert "| seq |" in (out / "suite.md").read_text()
