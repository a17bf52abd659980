"""The methods x attacks table on organism:small (one H100, organism already built), committed under docs/.

    python3 benchmarks/attack_table_small.py runs/<main job> runs/<undo run> [runs/<tar run> ...]

Runs one ``unlearn tamper`` grid: every given run directory plus the filtered twin (floor row) and the
base model (ceiling), attacked with full fine-tuning (lr 2e-5, the notebook's 110 steps, and lr 1e-4)
and LoRA r16 / r64 (lr 1e-4) on the tamper corpus, full fine-tuning on benign text, the per-layer
latent probe and in-context relearning (k 0, 4, 16). Writes docs/attack_table_small.md and
docs/attack_table_small.png (the grid's table and bars) and keeps the run in runs/attack-table-small.
``--preset tiny --steps 4`` runs the same grid on a CPU in a few minutes (a smoke test).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from unlearning.commands import tamper
from unlearning.core.paths import runs_root


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="method run directories (the models to attack)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=110)
    ap.add_argument("--name", default="attack-table-small")
    ap.add_argument("--docs", default="docs")
    ap.add_argument("--lr", default="2e-5,1e-4", help="the fine-tuning attacks' learning rates (a list)")
    ap.add_argument("--attacks", default="full,lora16,lora64,probe,icl", help="the attack kinds (a list)")
    ap.add_argument("--resume", action="store_true", help="(implied when the run folder exists: complete cells are kept)")
    a = ap.parse_args(argv)
    run = runs_root() / a.name  # where unlearn tamper puts it ($UNLEARNING_RUNS or ./runs)
    resume = a.resume or run.exists()
    common = ["--organism", a.preset, "--steps", str(a.steps), "--eval-every", str(max(1, a.steps // 5)),
              "--eval-general", "--name", a.name, *(["--resume"] if resume else [])]
    rc = tamper.main(["--model", *a.runs, "--attacks", a.attacks, "--data", "tamper",
                      "--lr", a.lr, *common])
    docs = Path(a.docs)
    docs.mkdir(exist_ok=True)
    shutil.copyfile(run / "table.md", docs / f"attack_table_{a.preset}.md")
    shutil.copyfile(run / "grid.png", docs / f"attack_table_{a.preset}.png")
    print(f"wrote {docs / f'attack_table_{a.preset}.md'} and .png")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
