"""Domain errors. Every error a user can meet derives from `PoolwatchError` and carries its exit code;
the CLI has one handler that prints the message as one line and exits with that code.

Kept free of heavy imports (torch) so any module can raise or catch these cheaply.
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_USAGE = 2


class PoolwatchError(Exception):
    """Base of poolwatch's domain errors; the message is one line fit for a user."""

    exit_code: int = EXIT_FAILED


class UsageError(PoolwatchError, ValueError):
    """What the user asked for makes no sense (a bad combination of options, an unknown run)."""

    exit_code = EXIT_USAGE


class ModelError(PoolwatchError, ValueError):
    """The model cannot be built or its weights cannot be loaded."""

    exit_code = EXIT_USAGE


class StateError(PoolwatchError):
    """The system is not in the state the command needs (no running daemon, a store without a model)."""

    exit_code = EXIT_FAILED


class BuildError(PoolwatchError):
    """Building a model's artifact failed for a reason that is not the model's (a full disk, a killed child)."""

    exit_code = EXIT_FAILED
