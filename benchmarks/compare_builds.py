"""Are two organism builds bit-identical? Compare every saved model tensor of two build folders.

    python benchmarks/compare_builds.py HOME_A/organism/small HOME_B/organism/small

Checks the unfiltered model, the filtered twin and every saved pretraining checkpoint, and prints
per model the number of tensors, how many differ, and the largest absolute difference. Exit status 0
when all are identical, 1 otherwise (a missing model in either build is an error, exit 2).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file


def model_dirs(root: Path) -> list[Path]:
    """Relative paths of every saved model (a folder with model.safetensors) under a build."""
    return sorted(p.parent.relative_to(root) for p in root.rglob("model.safetensors"))


def compare(a: Path, b: Path) -> tuple[int, int, float]:
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    if ta.keys() != tb.keys():
        raise SystemExit(f"{a} and {b} hold different tensor names")
    differ, worst = 0, 0.0
    for name, x in ta.items():
        if not torch.equal(x, tb[name]):
            differ += 1
            worst = max(worst, float((x.float() - tb[name].float()).abs().max()))
    return len(ta), differ, worst


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__)
        return 2
    root_a, root_b = Path(argv[0]), Path(argv[1])
    models, models_b = model_dirs(root_a), model_dirs(root_b)
    if not models or models != models_b:
        print(f"the builds hold different models: {models} vs {models_b}")
        return 2
    identical = True
    for rel in models:
        n, differ, worst = compare(root_a / rel, root_b / rel)
        identical &= differ == 0
        print(f"{str(rel):40s} {n:4d} tensors, {differ:4d} differ, max |diff| {worst:.3g}")
    print("identical" if identical else "NOT identical")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
