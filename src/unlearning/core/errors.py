"""Errors that carry a message for the user: the CLI prints them as one line, no traceback."""

from __future__ import annotations


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
