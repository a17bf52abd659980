"""Written files get the user's umask (0644 under 022), not the 0600 of temp-file writers.

``tempfile.mkstemp`` (the atomic writes) and safetensors >= 0.8 (``save_file``, so ``save_pretrained``)
create 0600 files whatever the umask; a run's results and weights must stay readable by the group or
other users the umask allows, and private where the umask says so.
"""

from __future__ import annotations

import os
import stat

import pytest
import torch

from run_setup import make_local_job
from tiny_models import save_tiny, tiny_model, tiny_tokenizer
from unlearning.core.io import atomic_write_bytes, atomic_write_json, atomic_write_yaml, match_umask
from unlearning.model.affine import AffineMap, save_affine
from unlearning.organism import pretrain
from unlearning import runner

UMASKS = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700)}  # umask -> (file mode, folder mode)


@pytest.fixture(params=sorted(UMASKS), ids=lambda m: f"umask{m:03o}")
def umask(request):
    """Run the test under this umask; the process umask is restored afterwards."""
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(root) -> dict[str, int]:
    """Permission bits of ``root`` and everything under it, by relative path."""
    items = [root, *root.rglob("*")] if root.is_dir() else [root]
    return {str(p.relative_to(root.parent)): stat.S_IMODE(p.stat().st_mode) for p in items}


def expected(root, umask) -> dict[str, int]:
    file_mode, dir_mode = UMASKS[umask]
    return {name: dir_mode if (root.parent / name).is_dir() else file_mode for name in modes(root)}


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    for path in (atomic_write_json(tmp_path / "results.json", {"a": 1}),
                 atomic_write_yaml(tmp_path / "config.yaml", {"a": 1}),
                 atomic_write_bytes(tmp_path / "blob.bin", b"x")):
        assert stat.S_IMODE(path.stat().st_mode) == UMASKS[umask][0], path.name


def test_an_overwritten_file_gets_the_umask_too(tmp_path, umask):
    path = tmp_path / "results.json"
    path.write_text("{}")
    path.chmod(0o600)
    atomic_write_json(path, {"a": 2})
    assert stat.S_IMODE(path.stat().st_mode) == UMASKS[umask][0]


@pytest.mark.parametrize("saver", ["runner", "organism"])
def test_saved_models_follow_the_umask(tmp_path, umask, saver):
    model, tok, folder = tiny_model("gpt_neox", layers=2), tiny_tokenizer(with_pad=True), tmp_path / "model"
    if saver == "runner":
        runner.save_model(model, tok, folder, None)
    else:
        pretrain.save_model(model, tok, folder)
    assert any(folder.glob("*.safetensors"))
    assert modes(folder) == expected(folder, umask)


def test_saved_affine_maps_follow_the_umask(tmp_path, umask):
    path = save_affine(tmp_path / "maps.safetensors", {0: AffineMap(torch.eye(4), torch.zeros(4))})
    assert stat.S_IMODE(path.stat().st_mode) == UMASKS[umask][0]


def test_mask_files_and_checkpoints_follow_the_umask(tmp_path, umask, monkeypatch):
    from unlearning.masking import masks
    from unlearning.masking.models import LinearProbe, save_scorer
    from unlearning.training.checkpoint import Checkpointer
    probe = save_scorer(LinearProbe(8, layer=1), tmp_path / "probe.safetensors", {})
    monkeypatch.setattr(masks, "cache_dir", lambda: tmp_path / "masks")
    cfg = masks.MaskConfig(kind="activation")
    masks._cached(cfg, "key", lambda: torch.ones(2, 3, dtype=torch.bool))
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save({"position": {"phase": 0, "step": 1, "global_step": 1}})
    for path in (probe, *(tmp_path / "masks").iterdir(), ckpt.path):
        assert stat.S_IMODE(path.stat().st_mode) == UMASKS[umask][0], path


def test_match_umask_opens_a_private_folder(tmp_path, umask):
    folder = tmp_path / "m"
    save_tiny(folder, family="gpt_neox", layers=2)
    for p in [folder, *folder.iterdir()]:
        p.chmod(0o700 if p.is_dir() else 0o600)
    assert modes(match_umask(folder)) == expected(folder, umask)


def test_a_run_writes_results_config_and_weights_with_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        make = make_local_job(tmp_path)
        runner.run(make("modes"))
    finally:
        os.umask(old)
    rundir = make.root / "modes"
    for name in ("results.json", "config.yaml", "metrics.jsonl"):
        assert stat.S_IMODE((rundir / name).stat().st_mode) == 0o644, name
    weights = list((rundir / "model").glob("*.safetensors"))
    assert weights and all(stat.S_IMODE(w.stat().st_mode) == 0o644 for w in weights)
