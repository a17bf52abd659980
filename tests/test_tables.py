"""The one table formatter (reporting.tables.format_table) and the tables built on it."""

from __future__ import annotations

from unlearning.reporting.tables import eval_table, format_table, quality_table


def test_format_table_is_markdown_with_aligned_columns():
    table = format_table(["model", "acc"], [["base", 0.81234], ["twin", None], ["n", 7]])
    assert table.splitlines() == ["| model | acc    |", "|-------|--------|", "| base  | 0.8123 |",
                                  "| twin  | -      |", "| n     | 7      |"]
    assert format_table(["a"], [[0.5]], digits=2).splitlines()[-1] == "| 0.50 |"


def test_eval_table_keeps_its_columns_and_puts_groups_last():
    results = {"grp": {"format": "letter", "n": 6, "acc": 0.5, "acc_stderr": 0.2, "subtasks": ["t"]},
               "t": {"format": "cloze", "n": 3, "acc": 1.0, "acc_stderr": 0.0, "acc_norm": 1.0, "correct_prob": 0.9}}
    lines = eval_table(results).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == ["task", "format", "n", "acc", "±", "acc_norm",
                                                                  "correct_prob"]
    assert lines[2].startswith("| t ") and "0.9000" in lines[2]
    assert lines[3].startswith("| grp ") and lines[3].rstrip().endswith("| -            |")


def test_quality_table_rows_per_model_and_its_footnote():
    accs = {"heldout": {d: {f: {"acc": 0.25} for f in ("cloze", "letter")}
                        for d in ("hazard", "benign_bio", "general")}}
    table = quality_table({"unfiltered": accs, "filtered": accs, "checkpoints": {"step5": accs},
                           "early_checkpoint": "step5"})
    lines = table.splitlines()
    assert lines[0].startswith("| model") and "hazard/cloze" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[2:5]] == ["unfiltered", "filtered", "@step5"]
    assert "0.250" in lines[2] and lines[-1].endswith("early checkpoint: step5")
