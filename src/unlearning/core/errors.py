"""Every error class of the project, in one module that imports nothing of the project.

A :class:`UserError` carries a message for the user: the CLI prints it as one line, no traceback.
"""

from __future__ import annotations

from typing import Literal

ProbeFailure = Literal["gated", "no_revision", "no_repo", "unreachable"]


class UserError(Exception):
    """Bad input: the message names the field and the fix."""


class DataError(UserError, ValueError):
    """A data file is missing, empty, or has a bad row."""


class CorruptFileError(UserError, OSError):
    """A saved file (weights, a cache's JSON) is truncated or unreadable; the message names it and how
    to write it again."""


class ModelNotFoundError(UserError, OSError):
    """A model id or path cannot be resolved (offline hub, missing folder)."""


class NonFiniteLossError(UserError, FloatingPointError):
    """A loss became NaN or infinite; the message names step, layer and loss term."""


class ConfigError(UserError, ValueError):
    """A config key is unknown, of the wrong type, or out of range."""


class NonFiniteScoreError(UserError, FloatingPointError):
    """A log-likelihood is NaN or infinite: the evaluation fails rather than report a number."""


class HubProbeError(Exception):
    """The hub said the repository cannot be had, or did not answer in time (callers word their own
    message from ``kind``, so this is not a UserError)."""

    def __init__(self, kind: ProbeFailure, revision: str | None, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.revision, self.detail = kind, revision, detail

    def reason(self, *, gated: str, no_repo: str) -> str:
        """Why, in a caller's words for a gated or missing repository (they name what it is)."""
        if self.kind == "gated":
            return gated
        if self.kind == "no_repo":
            return no_repo
        if self.kind == "no_revision":
            return f"the hub has no revision {self.revision!r}"
        return f"the hub cannot be reached ({self.detail})"


def one_line(e: BaseException) -> str:
    """An exception as the one line results.json records (and the CLI prints)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if isinstance(e, UserError) else f"{type(e).__name__}: {text}".rstrip(": ")
