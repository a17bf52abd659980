"""The one command-line convention: every command's --help lists its keys, unknown keys are one-line
errors, dotted overrides / lists / positionals / aliases parse, and eval settings reach evaluate()."""

from __future__ import annotations

import dataclasses
import time
import typing
from pathlib import Path

import pytest

from unlearning import cli
from unlearning.commands import eval as eval_command
from unlearning.commands import fit_affine, mask, organism, ranks, report, sweep, tamper, tune
from unlearning.commands import run as run_command
from unlearning.core import cli as core_cli
from unlearning.core.errors import ConfigError
from unlearning.core.errors import UserError
from unlearning.runner import RunConfig, load_run_config

ROOT = Path(__file__).resolve().parents[1]

# command words -> (its dataclass, the config whose keys it also takes)
COMMANDS = {
    ("run",): (run_command.RunOptions, RunConfig),
    ("eval",): (eval_command.EvalConfig, None),
    ("tamper",): (tamper.TamperCommandConfig, None),
    ("sweep",): (sweep.SweepConfig, RunConfig),
    ("tune",): (tune.TuneConfig, RunConfig),
    ("report",): (report.ReportConfig, None),
    ("ranks",): (ranks.RanksConfig, None),
    ("organism",): (organism.OrganismCommandConfig, None),
    ("fit-affine",): (fit_affine.FitAffineConfig, None),
    ("mask", "train"): (mask.MaskTrainConfig, None),
    ("mask", "report"): (mask.MaskReportConfig, None),
}


def leaf_keys(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """Every leaf key by a plain dataclasses.fields walk (independent of core/cli.py's)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        if dataclasses.is_dataclass(inner[0]):
            out += leaf_keys(inner[0], f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, f))
    return out


def test_the_dispatcher_knows_every_command_tested_here():
    assert {words[0] for words in COMMANDS} == set(cli.COMMANDS)


@pytest.mark.parametrize("words", list(COMMANDS), ids=" ".join)
def test_help_lists_every_key_with_type_and_default(words, capsys):
    cls, config = COMMANDS[words]
    assert cli.main([*words, "--help"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    own = {path for path, _ in leaf_keys(cls)}
    keys = leaf_keys(cls) + [(p, f) for p, f in (leaf_keys(config) if config else []) if p not in own]
    assert len(keys) > 2
    for path, f in keys:
        flag = path.upper() if f.metadata.get("positional") else "--" + path.replace("_", "-")
        at = [i for i, line in enumerate(lines) if line.startswith("  ") and not line.startswith("   ")
              and line.split()[0].rstrip(",") in (flag, flag + ".KEY")]
        assert at, f"{flag} missing from {' '.join(words)} --help"
        row = " ".join(lines[at[0]:at[0] + 2])
        assert "default " in row, row
        if f.metadata.get("help"):
            assert f.metadata["help"][:30] in out.replace("\n", " ").replace("  ", " ") or \
                f.metadata["help"][:20] in row


@pytest.mark.parametrize("words", list(COMMANDS), ids=" ".join)
def test_an_unknown_key_is_a_one_line_error_naming_it(words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written before the options are checked
    start = time.perf_counter()
    assert cli.main([*words, "--bogus", "1"]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bogus: unknown key" in err and "allowed keys are" in err
    assert not list(tmp_path.iterdir())


def parse(cls, argv, config=None):
    return core_cli.parse_command(cls, argv, prog="t", config=config)


def test_run_needs_no_config_file_and_takes_both_spellings(monkeypatch):
    seen = {}

    def fake_run(cfg, **kwargs):
        seen.update(cfg=cfg, **kwargs)
        return {}
    monkeypatch.setattr(run_command, "run", fake_run)
    assert run_command.main(["--name", "x", "--train.optimizer.lr", "1e-3", "--eval.batch-size=8",
                             "--eval.add_bos_token", "true", "--eval.tasks", "a,b", "--overwrite"]) == 0
    cfg = seen["cfg"]
    assert cfg.name == "x" and cfg.train.optimizer.lr == 1e-3 and cfg.eval.batch_size == 8
    assert cfg.eval.add_bos_token is True and cfg.eval.tasks == ["a", "b"]
    assert seen["resume"] is False and seen["overwrite"] is True and seen["force"] is False
    # the shipped default config is the base: its keys are kept under the command line's
    shipped = load_run_config(run_command.default_config_path())
    assert cfg.method == shipped.method and cfg.data == shipped.data
    # a config file given positionally anywhere, with a bool flag before it
    path = ROOT / "src" / "unlearning" / "configs" / "rmu_tiny.yaml"
    assert run_command.main(["--resume", str(path), "--name=y"]) == 0
    assert seen["cfg"].method == "rmu" and seen["cfg"].name == "y" and seen["resume"] is True


def test_a_method_sections_number_lists_take_commas_on_the_command_line(monkeypatch):
    # tar.* is read as a mapping until the method is known: its lists still follow the comma convention
    seen = {}
    monkeypatch.setattr(run_command, "run", lambda cfg, **kwargs: seen.update(cfg=cfg) or {})
    path = ROOT / "src" / "unlearning" / "configs" / "tar_tiny.yaml"
    assert run_command.main([str(path), "--tar.adversary_lrs", "2e-5,1e-4", "--tar.adversary_steps", "8,16"]) == 0
    tar = seen["cfg"].method_config()
    assert tar.adversary_lrs == [2e-5, 1e-4] and tar.adversary_steps == [8, 16]


def test_eval_settings_reach_evaluate_in_run_and_tamper(monkeypatch):
    import unlearning.evaluation as evaluation
    from unlearning import runner
    from unlearning.attacks.tamper import AttackConfig, evaluation_point
    calls, task_contexts = [], []

    def fake_evaluate(model, tokenizer, tasks, **kwargs):
        calls.append(kwargs)
        return {"t": {"acc": 0.5, "n": 1, "format": "cloze"}}

    def fake_get_tasks(names, organism=None, **context):
        task_contexts.append(context)
        return list(names)
    from unlearning.attacks import tamper as attacks_tamper
    for module in (evaluation, runner, attacks_tamper):  # imported at call time or at module level
        monkeypatch.setattr(module, "evaluate", fake_evaluate, raising=False)
        monkeypatch.setattr(module, "get_tasks", fake_get_tasks, raising=False)
    (_, overrides) = parse(run_command.RunOptions, ["--eval.add-bos-token", "--eval.max_length", "64",
                                                    "--eval.mixed-precision", "false", "--eval.num-fewshot", "5",
                                                    "--eval.fewshot-data", "dev.jsonl"], config=RunConfig)
    cfg = load_run_config(run_command.default_config_path(), overrides)
    runner.evaluate_model(None, None, cfg, "tiny", "cpu")
    assert calls[-1]["add_bos_token"] is True and calls[-1]["max_length"] == 64
    assert calls[-1]["mixed_precision"] is False and calls[-1]["num_fewshot"] == 5
    assert task_contexts[-1] == {"num_fewshot": 5, "fewshot_data": "dev.jsonl"}
    attack = AttackConfig(model="m")
    attack.eval.tasks, attack.eval.add_bos_token, attack.eval.max_length = ["t"], False, 32
    attack.eval.num_fewshot = 3
    assert "eval" in evaluation_point(None, None, attack, "cpu")
    assert calls[-1]["add_bos_token"] is False and calls[-1]["max_length"] == 32
    assert calls[-1]["num_fewshot"] == 3 and task_contexts[-1]["num_fewshot"] == 3


def test_lists_positionals_bools_and_bad_values():
    cfg, _ = parse(report.ReportConfig, ["a", "b", "--columns", "x,y", "--no-baseline"])
    assert cfg.runs == ["a", "b"] and cfg.columns == ["x", "y"] and cfg.baseline is False
    cfg, _ = parse(report.ReportConfig, ["a", "--columns=[p, q]", "--baseline", "false"])
    assert cfg.columns == ["p", "q"] and cfg.baseline is False
    with pytest.raises(ConfigError, match="grid: required"):
        parse(sweep.SweepConfig, ["--dry-run"])
    with pytest.raises(ConfigError, match="needs a value"):
        parse(ranks.RanksConfig, ["--model"])
    with pytest.raises(ConfigError, match="^c: unexpected argument"):
        parse(ranks.RanksConfig, ["--model", "m", "c"])
    with pytest.raises(ConfigError, match="^full_weights: expected true or false"):
        parse(ranks.RanksConfig, ["--model", "m", "--full-weights=maybe"])
    with pytest.raises(ConfigError, match=r"^train.bogus: unknown key.*allowed keys are train\.batch-size"):
        parse(run_command.RunOptions, ["--train.bogus", "1"], config=RunConfig)
    # strings stay as written; other values are YAML; several words for a `many` list
    cfg, _ = parse(fit_affine.FitAffineConfig, ["--model", "organism:tiny", "--out", "1e3", "--layers", "1,3",
                                                "--data", "a.jsonl", "b.jsonl", "--ridge", "1e-2"])
    assert (cfg.out, cfg.layers, cfg.data, cfg.ridge) == ("1e3", "1,3", ["a.jsonl", "b.jsonl"], 0.01)
    cfg, _ = parse(mask.MaskReportConfig, ["--keywords", r"\bw{1,2}\b", "x", "--kind", "keyword,probe"])
    assert cfg.keywords == [r"\bw{1,2}\b", "x"] and cfg.kind == ["keyword", "probe"]


def test_eval_config_file_is_under_the_command_line(tmp_path):
    path = tmp_path / "e.yaml"
    path.write_text("model: m\nbatch_size: 4\nlimit: 3\n")
    cfg, _ = parse(eval_command.EvalConfig, ["--config", str(path), "--limit", "5"])
    assert (cfg.model, cfg.batch_size, cfg.limit) == ("m", 4, 5)
    path.write_text("model: m\nbogus: 1\n")
    with pytest.raises(ConfigError, match="^bogus: unknown key"):
        parse(eval_command.EvalConfig, ["--config", str(path)])


def test_failed_eval_leaves_no_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["eval", "--model", str(tmp_path / "nothere"), "--tasks", "no_such_task",
                     "--output-dir", str(out)]) == 2
    assert "no_such_task" in capsys.readouterr().err and not out.exists()


def test_tamper_grid_aliases_and_recipe_defaults():
    from unlearning.attacks.cells import attack_configs
    from unlearning.attacks.tamper import GENERAL_TASK, AttackConfig
    cfg, _ = parse(tamper.TamperCommandConfig, [
        "--model", "organism:tiny", "organism:tiny-filtered", "--steps", "7", "--eval-every", "3", "--lr",
        "2e-5,1e-4", "--lora", "4", "--limit", "5", "--eval-batch-size", "8", "--eval-general",
        "--attack.eval.add-bos-token", "true"])
    attacks = attack_configs(cfg)
    assert len(attacks) == 4 and {a.optimizer.lr for _, a in attacks} == {2e-5, 1e-4}
    _, first = attacks[0]
    assert (first.steps, first.eval_every, first.lora_rank) == (7, 3, 4)
    assert (first.eval.limit, first.eval.batch_size, first.eval.add_bos_token) == (5, 8, True)
    assert first.eval.tasks == AttackConfig().eval.tasks + [GENERAL_TASK]
    # an unset swept key is the recipe's value: the recipe's defaults are not repeated
    default = AttackConfig()
    cfg, _ = parse(tamper.TamperCommandConfig, ["--model", "organism:tiny", "--attack.optimizer.lr", "5e-5",
                                                "--reference", "none"])  # (auto: the twin is attacked too)
    (_, only), = attack_configs(cfg)
    assert only.optimizer.lr == 5e-5 and only.seed == default.seed and only.optimizer.schedule == \
        default.optimizer.schedule and only.steps == default.steps
    with pytest.raises(UserError, match="^model: give at least one model"):
        attack_configs(parse(tamper.TamperCommandConfig, [])[0])


def test_sweep_passes_overrides_to_every_row(monkeypatch, tmp_path):
    seen = {}

    def fake_run_grid(grid, **kwargs):
        seen.update(grid=grid, **kwargs)
        return []
    monkeypatch.setattr(sweep, "run_grid", fake_run_grid)
    monkeypatch.setattr(sweep, "report_table", lambda runs, columns: "")
    grid = ROOT / "src" / "unlearning" / "configs" / "grids" / "kl_retain_cb_grid.yaml"
    assert sweep.main([str(grid), "--train.seed", "3", "--retry-failed", "--slurm.timeout-min", "5",
                       "--output-dir", str(tmp_path)]) == 0
    assert seen["overrides"] == {"train": {"seed": 3}} and seen["retry_failed"] is True
    assert seen["slurm"].timeout_min == 5 and seen["slurm"].nodes == 1 and seen["output_dir"] == str(tmp_path)
    row = sweep.row_config(seen["grid"], seen["grid"].rows[0], str(tmp_path), seen["overrides"])
    assert row.train.seed == 3


def shipped_configs() -> list[Path]:
    found = {p.resolve() for d in ("configs", "src/unlearning/configs", "examples") for p in (ROOT / d).rglob("*.yaml")}
    return sorted(found)


@pytest.mark.parametrize("path", shipped_configs(), ids=lambda p: p.name)
def test_every_shipped_config_loads(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    from unlearning.sweep import load_grid, row_config
    if "grids" in path.parts:
        grid = load_grid(path)
        for row in grid.rows:
            row_config(grid, row)
    else:
        cfg = load_run_config(path)
        assert cfg.eval.tasks


def test_tamper_resume_allows_another_eval_batch_size_only(tmp_path):
    from unlearning.attacks.tamper import AttackConfig, _check_resumable, new_curve
    curve = new_curve(AttackConfig(), "a", None)
    other = AttackConfig()
    other.eval.batch_size = 4
    _check_resumable(curve, other, tmp_path)  # the batch size changes no number
    other.eval.add_bos_token = True
    with pytest.raises(ConfigError, match=r"eval\.add_bos_token changed"):
        _check_resumable(curve, other, tmp_path)
