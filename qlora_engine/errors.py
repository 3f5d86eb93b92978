"""The failures a user can act on. Every layer raises these; the CLI turns each into one line on
stderr and an exit code, with no traceback unless asked (`--debug`).

The message is the whole story: what is wrong, where (file, tensor, flag, line) and what to do.
- `InputError` (exit 2): something the user gave is wrong: a file, a flag, a config value, data.
- `RunError` (exit 1): the input was fine but the run could not go on (a full disk, a lost rank).
Touches nothing.
"""

from __future__ import annotations


class QloraError(Exception):
    """Base of the engine's expected failures; `exit_code` is what the CLI exits with."""

    exit_code = 1


class InputError(QloraError, ValueError):
    """Bad input: a file, flag, config value or data the user can fix."""

    exit_code = 2


class RunError(QloraError, RuntimeError):
    """The run could not go on although its input was valid."""

    exit_code = 1
