"""The shipped grids and the CPU configs: every grid row validates, the CPU configs' layers exist in the
tiny organism, the README's "Use" lines run CPU configs, and the tiny grid's rows really differ.

(Every shipped config validating on its own: test_sequential_organism.py.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from unlearning.cli import COMMANDS
from unlearning.core.config import ConfigError, merge
from unlearning.core.io import read_json
from unlearning.methods import method_module, sequential as seq
from unlearning.methods.representation import resolve_target_layers
from unlearning.model.layers import parse_layer_spec
from unlearning.organism import PRESETS
from unlearning.runner import RunConfig, load_run_config
from unlearning.sweep import load_grid, row_config, run_grid

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "src" / "unlearning" / "configs"
TINY_DEPTH = PRESETS["tiny"].model.num_layers
CPU_CONFIGS = sorted(p.name for p in CONFIGS.glob("*_tiny.yaml"))


def target_layers(cfg: RunConfig, depth: int) -> list[int]:
    """The layers a config's method trains at on a model of ``depth`` layers (ConfigError if they don't exist)."""
    method = cfg.method_config()
    if cfg.method == "sequential":
        return seq.target_layers(method.layers, depth)
    if hasattr(method, "target_layers"):
        return resolve_target_layers(method.target_layers, depth, field=f"{cfg.method}.target_layers")
    return parse_layer_spec([method.layer], depth, field=f"{cfg.method}.layer")


RESISTING = ("undo", "tar")  # they harden the README main job's model (runs/main: the tiny organism, unlearned)


def runs_on_tiny(cfg: RunConfig) -> None:
    """The config's model is the tiny organism on a CPU (or, for a method that resists tampering, the
    main job's run of it), and its method's layers exist there."""
    if cfg.method in RESISTING:
        assert cfg.model == "runs/main", cfg.model
        method_module(cfg.method).validate(cfg.method_config(), TINY_DEPTH)
        return
    assert cfg.model in ("organism:tiny", "auto"), cfg.model
    target_layers(cfg, TINY_DEPTH)


@pytest.mark.parametrize("grid", sorted(p.name for p in (CONFIGS / "grids").glob("*.yaml")))
def test_every_row_of_every_shipped_grid_validates(grid):
    loaded = load_grid(CONFIGS / "grids" / grid)
    assert loaded.rows
    for row in loaded.rows:
        row_config(loaded, row, output_dir="out")


@pytest.mark.parametrize("name", CPU_CONFIGS)
def test_cpu_configs_name_the_tiny_organism_and_its_layers(name):
    cfg = load_run_config(CONFIGS / name)
    if cfg.method in RESISTING:
        runs_on_tiny(cfg)
        return
    assert cfg.model == "organism:tiny"
    assert all(0 <= i < TINY_DEPTH for i in target_layers(cfg, TINY_DEPTH))


def test_the_gpu_config_does_not_fit_tiny():
    """What the README says: full_muon.yaml's layers 31->11:4 do not exist in the 4-layer tiny organism."""
    with pytest.raises(ConfigError, match="sequential.layers"):
        target_layers(load_run_config(CONFIGS / "full_muon.yaml"), TINY_DEPTH)


def readme_use_lines() -> list[list[str]]:
    block = re.search(r"## Use\n.*?```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    return [shlex.split(line.split("  #")[0]) for line in block.splitlines() if line.strip()]


def test_readme_use_lines_run_cpu_configs_on_the_tiny_organism():
    lines = readme_use_lines()
    assert {line[1] for line in lines} >= {"run", "sweep", "tamper", "eval", "report", "ranks", "organism"}
    for line in lines:
        assert line[0] == "unlearn" and line[1] in COMMANDS, line
        assert not any("small" in word for word in line), line   # organism:small / --preset small: a GPU
        if line[1] == "run":
            runs_on_tiny(load_run_config(REPO / line[2], line[3:]))
        elif line[1] == "sweep":
            grid = load_grid(REPO / line[2])
            for row in grid.rows:
                runs_on_tiny(row_config(grid, row, output_dir="out"))


@pytest.mark.slow
def test_tiny_grid_rows_differ(tiny_organism, tmp_path):
    """Two rows of kl_retain_cb_grid_tiny.yaml, trained as shipped: the retain coefficient shows in the
    retained domain (on a full sweep: benign-bio 0.65 at retain 1, 0.80 at retain 10)."""
    grid = load_grid(CONFIGS / "grids" / "kl_retain_cb_grid_tiny.yaml")
    quick_eval = {"eval": {"tasks": ["organism_benign_bio_cloze"], "before": False, "reference": None},
                  "save": {"model": False, "adapter": False, "models_dir": None}}
    grid.base = merge(grid.base, quick_eval)
    grid.rows = [r for r in grid.rows if (r.overrides["checkpoint_transfer.retain_coef"],
                                          r.overrides["checkpoint_transfer.remove_coef"]) in ((1, 3), (10, 5))]
    assert len(grid.rows) == 2
    outcomes = run_grid(grid, output_dir=str(tmp_path))
    assert [o.status for o in outcomes] == ["complete", "complete"], [o.note for o in outcomes]
    accs = [read_json(o.path / "results.json")["after"]["organism_benign_bio_cloze"]["acc"] for o in outcomes]
    assert accs[1] - accs[0] > 0.05, accs
