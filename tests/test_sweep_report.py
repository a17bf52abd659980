"""Grid files expand into validated run configs; report tables put the baseline row first."""

import json

import pytest

from unlearning.core.errors import ConfigError
from unlearning.reporting.report import report_table
from unlearning.sweep import load_grid, row_config


def test_shipped_notebook_grid_has_the_six_rows():
    grid = load_grid("configs/grids/kl_retain_cb_grid.yaml")
    pairs = [(r.overrides["checkpoint_transfer.retain_coef"], r.overrides["checkpoint_transfer.remove_coef"])
             for r in grid.rows]
    assert pairs == [(1, 3), (3, 5), (5, 5), (10, 5), (5, 10), (10, 10)]
    cfg = row_config(grid, grid.rows[3], output_dir="out")
    assert cfg.method == "checkpoint_transfer" and cfg.checkpoint_transfer["retain_coef"] == 10
    assert cfg.name == f"{grid.name}/{grid.rows[3].name}"


def test_product_grid_and_bad_keys(tmp_path):
    (tmp_path / "base.yaml").write_text("method: sequential\n")
    (tmp_path / "g.yaml").write_text("base: base.yaml\ngrid:\n  train.seed: [0, 1]\n  sequential.remove_coef: [5, 10]\n")
    grid = load_grid(tmp_path / "g.yaml")
    assert len(grid.rows) == 4
    (tmp_path / "bad.yaml").write_text("base: base.yaml\nrows:\n  - {sequential.remove_cof: 5}\n")
    with pytest.raises(ConfigError, match="remove_cof"):
        row_config(load_grid(tmp_path / "bad.yaml"), load_grid(tmp_path / "bad.yaml").rows[0])


def test_report_table_baseline_runs_reference_and_training_metric(tmp_path):
    def run(name, after, coef):
        d = tmp_path / name
        d.mkdir()
        (d / "config.yaml").write_text(f"sequential:\n  remove_coef: {coef}\n")
        (d / "results.json").write_text(json.dumps({
            "before": {"organism_hazard_cloze": {"acc": 0.99}},
            "after": {"organism_hazard_cloze": {"acc": after}},
            "reference": {"organism_hazard_cloze": {"acc": 0.26}}, "reference_model": "twin"}))
        (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "cb_loss": s / 10}) + "\n" for s in (1, 32, 40)))
        return d
    table = report_table([run("a", 0.5, 5), run("b", 0.3, 10)],
                         ["sequential.remove_coef", "organism_hazard_cloze:acc", "train:cb_loss@32"])
    lines = table.splitlines()
    assert lines[2].startswith("| baseline") and "0.9900" in lines[2]
    assert "| a " in lines[3] and "0.5000" in lines[3] and "3.2000" in lines[3] and "| 5 " in lines[3]
    assert lines[-1].startswith("| reference (twin)") and "0.2600" in lines[-1]
