"""Errors meant for the user: the entry points print their message (no traceback) and exit 1."""


class IFTError(Exception):
    """Base class: a problem the user can fix; the message names it and the fix."""


class ConfigError(IFTError, ValueError):
    """A config value is invalid (names the key and the allowed values)."""


class CheckpointError(IFTError, RuntimeError):
    """A checkpoint is missing, unreadable, unsafe or does not match the model."""
