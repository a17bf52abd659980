"""Reaching the Hugging Face hub: the offline switch and one fast reachability probe.

Models (:mod:`unlearning.model.loading`) and datasets (:mod:`unlearning.data.hub`, ``hub:`` text
sources in :mod:`unlearning.data.text`) ask the same two questions before the slow, retrying
downloaders of ``huggingface_hub`` / ``datasets`` run:

- :func:`hub_offline`: is ``HF_HUB_OFFLINE`` (or a library's own switch) set? Then only the
  local cache may be used.
- :func:`probe_hub`: one metadata request with a short timeout. A failure raises
  :class:`HubProbeError` whose ``kind`` says why (``gated``, ``no_revision``, ``no_repo``,
  ``unreachable``); each caller words its own error message from it.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from unlearning.core.errors import HubProbeError

HUB_TIMEOUT_S = 10.0  # one metadata request; a missing network fails within this
_TRUE = {"1", "ON", "YES", "TRUE"}


def hub_offline(*also: str) -> bool:
    """Whether ``HF_HUB_OFFLINE`` or one of the variables ``also`` (e.g. ``TRANSFORMERS_OFFLINE``,
    ``HF_DATASETS_OFFLINE``) is set to a true value, read now (tests and users may change it)."""
    return any(os.environ.get(v, "").strip().upper() in _TRUE for v in ("HF_HUB_OFFLINE", *also))


def probe_hub(repo_id: str, revision: str | None, *, repo_type: Literal["model", "dataset"],
              timeout: float = HUB_TIMEOUT_S) -> Any:
    """The repository's metadata (``ModelInfo`` / ``DatasetInfo``) from one request of at most
    ``timeout`` seconds; :class:`HubProbeError` when it is gated, missing, lacks ``revision`` or
    the hub cannot be reached."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()
    try:
        if repo_type == "dataset":
            return api.dataset_info(repo_id, revision=revision, timeout=timeout)
        return api.model_info(repo_id, revision=revision, timeout=timeout)
    except GatedRepoError as e:  # a subclass of RepositoryNotFoundError: test it first
        raise HubProbeError("gated", revision, str(e)) from None
    except RevisionNotFoundError as e:
        raise HubProbeError("no_revision", revision, str(e)) from None
    except RepositoryNotFoundError as e:
        raise HubProbeError("no_repo", revision, str(e)) from None
    except Exception as e:  # network errors of whichever HTTP client huggingface_hub uses
        raise HubProbeError("unreachable", revision, f"{type(e).__name__}: {e}") from None
