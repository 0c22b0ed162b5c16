"""The one base class of every user error: bad config, paths, prompts, images, checkpoints or weights files.

The command line catches :class:`UserError` and prints its message on one line with exit status 2 (no traceback).
Each room defines its own subclass (``ConfigError``, ``CheckpointError``, ``DataError``, ...) so callers can tell
them apart; the message always names the problem and the fix.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user can fix; the message says what and how."""


class TrainingError(UserError, RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""
