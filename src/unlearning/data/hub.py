"""Hub datasets at pinned revisions, with local-file stand-ins and fast, clear offline failures.

Every named benchmark and corpus of the project is a :class:`HubDataset`: a hub id, a config, a
split and a pinned revision. It is read, in this order, from

1. an explicit local file (``--tasks wmdp_bio=/path/file.parquet``; ``source: /path/file.jsonl``);
2. ``$UNLEARNING_DATA_DIR/<name>.{parquet,jsonl,json}`` (or a folder ``<name>/`` of such files):
   the same run configs then work on a machine without hub access;
3. the Hugging Face hub (or its local cache under ``HF_HOME``) through ``datasets``.

A local file has the hub dataset's columns (see docs/benchmarks.md). Reaching the hub is tried
once with a short timeout before ``datasets`` (which otherwise retries for half a minute); an
unreachable, gated or missing dataset raises :class:`DataError` naming the id, the revision,
``HF_HOME`` / ``HF_HUB_OFFLINE`` and the local-file alternatives.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearning.core.errors import DataError, HubProbeError
from unlearning.core.hub import hub_offline, probe_hub

log = logging.getLogger(__name__)

DATA_DIR_ENV = "UNLEARNING_DATA_DIR"
LOCAL_SUFFIXES = (".parquet", ".jsonl", ".json")
_reachable: dict[tuple[str, str | None], None] = {}  # hub ids already found reachable in this process


@dataclass(frozen=True)
class HubDataset:
    """Where a named dataset lives on the hub."""

    path: str  # hub id, e.g. "cais/mmlu"
    name: str | None  # config, e.g. "anatomy"
    split: str
    revision: str | None  # pinned commit; None: the default branch (a warning says it is unpinned)

    def describe(self) -> str:
        at = f"@{self.revision[:12]}" if self.revision else "@main (unpinned)"
        cfg = f", config {self.name!r}" if self.name else ""
        return f"{self.path}{at}{cfg}, split {self.split!r}"


# ---------------------------------------------------------------------------------------------
# local files


def data_dir() -> Path | None:
    value = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


def local_override(name: str) -> Path | None:
    """``$UNLEARNING_DATA_DIR/<name>.parquet|.jsonl|.json`` or ``<name>/`` when present."""
    root = data_dir()
    if root is None:
        return None
    for suffix in LOCAL_SUFFIXES:
        if (root / f"{name}{suffix}").is_file():
            return root / f"{name}{suffix}"
    if (root / name).is_dir() and any(p.suffix in LOCAL_SUFFIXES for p in (root / name).iterdir()):
        return root / name
    return None


# ---------------------------------------------------------------------------------------------
# the hub


def _fix_hint(local_hint: str) -> str:
    from huggingface_hub import constants
    return (f"Either give a local file in the same schema ({local_hint}), or "
            f"download it where the hub is reachable into the Hugging Face cache (HF_HOME, now "
            f"{constants.HF_HOME}) and set HF_HUB_OFFLINE=1 here to read that cache")


def _check_reachable(spec: HubDataset, what: str, local_hint: str) -> None:
    """One metadata request with a short timeout, so an unreachable hub fails at once."""
    key = (spec.path, spec.revision)
    if hub_offline("HF_DATASETS_OFFLINE") or key in _reachable:
        return
    try:
        probe_hub(spec.path, spec.revision, repo_type="dataset")
    except HubProbeError as e:
        reason = e.reason(gated="the dataset is gated: accept its terms on the hub and log in (`hf auth login`)",
                          no_repo="the hub has no such dataset (or it is private or gated: log in with "
                                  "`hf auth login`)")
        raise DataError(f"{what}: {spec.describe()}: {reason}. {_fix_hint(local_hint)}") from None
    _reachable[key] = None


def load_hub_dataset(spec: HubDataset, what: str, local_hint: str) -> Any:
    """``datasets.Dataset`` of ``spec`` (from the cache when offline); DataError on failure."""
    _check_reachable(spec, what, local_hint)
    if spec.revision is None:
        log.warning("%s: %s is not pinned to a revision; results may change when the dataset does",
                    what, spec.path)
    import datasets
    try:
        return datasets.load_dataset(spec.path, spec.name, split=spec.split, revision=spec.revision)
    except Exception as e:  # offline without a cache, wrong split, gated: say which and how to fix
        reason = f"{type(e).__name__}: {e}"
        if hub_offline("HF_DATASETS_OFFLINE"):
            reason += " (HF_HUB_OFFLINE is set and the dataset is not in the cache)"
        raise DataError(f"{what}: {spec.describe()} could not be loaded ({reason}). "
                        f"{_fix_hint(local_hint)}") from None
