"""The one error path of every command: an expected failure becomes one line on stderr (what is
wrong, where, what to do) and an exit code: 2 for bad input, 1 for a run that could not go on,
130 for an interrupt. `--debug` or QLORA_ENGINE_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback

from ..errors import QloraError


def debug_wanted(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("QLORA_ENGINE_DEBUG", "") not in ("", "0")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def describe(e: BaseException) -> tuple[str, int]:
    """(the one line, the exit code) of an expected failure; ("", 0) when it is not one."""
    if isinstance(e, QloraError):
        return first_line(e), e.exit_code
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        where = f" writing {e.filename}" if e.filename else ""
        return f"{e.strerror or e}{where}: free some space (or raise the file size limit) and run again; " \
               "files already written are intact", 1
    if isinstance(e, (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)):
        where = f": {e.filename}" if e.filename and str(e.filename) not in str(e) else ""
        return first_line(e) + where, 2
    if isinstance(e, ValueError):  # the format's and torch's own checks on what was given
        return first_line(e), 2
    return "", 0


def run(fn, argv: list[str]) -> int:
    """fn(argv) -> exit code, with the one error path around it."""
    debug = debug_wanted(argv)
    try:
        return int(fn(argv) or 0)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, its one line already printed)
        return e.code if isinstance(e.code, int) else 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - sorted into expected (one line) and not (traceback)
        line, code = describe(e)
        if debug or not code:
            traceback.print_exc()
            return code or 1
        print(f"error: {line}", file=sys.stderr)
        return code
