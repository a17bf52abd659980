"""benchmarks/resist_small.py's table rows and plot from attack results (no training: the GPU script's
summary step, on numbers shaped as its runs and attacks return them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "resist_small.py"


def load_script():
    spec = importlib.util.spec_from_file_location("resist_small", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def evals(hazard: float, general: float) -> dict:
    return {"organism_hazard_cloze": {"acc": hazard}, "organism_benign_bio_cloze": {"acc": 0.8},
            "organism_general_cloze": {"acc": general}}


def test_rows_carry_each_model_s_peaks_and_the_plot_is_written(tmp_path):
    rs = load_script()
    runs = {"main": {"run_dir": "/r/main", "before": evals(0.88, 0.87), "reference": evals(0.27, 0.90),
                     "after": evals(0.43, 0.84)},
            "undo": {"run_dir": "/r/undo", "after": evals(0.29, 0.92),
                     "train_summary": {"undo": {"compute_fraction_filtered": 1.007}}}}
    attacks = {"full": {"organism:tiny-filtered": 0.25, "/r/main": 0.75, "/r/undo": 0.30},
               "lora16": {"organism:tiny-filtered": 0.27, "/r/main": 0.83, "/r/undo": 0.30}}
    rows = rs.summarise(runs, attacks, "tiny")
    assert [r["model"] for r in rows] == ["organism:tiny (base)", "organism:tiny-filtered (twin)", "main", "undo"]
    assert rows[0]["hazard"] == 0.88 and rows[0]["peak_full"] is None  # the base is not attacked
    assert (rows[1]["peak_full"], rows[2]["peak_lora16"], rows[3]["compute"]) == (0.25, 0.83, 1.007)
    rs.plot(rows, tmp_path / "resist.png")
    data = (tmp_path / "resist.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
