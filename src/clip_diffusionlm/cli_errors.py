"""Clean command-line errors: a user's mistake ends with one `error: ...` message and exit status 2, not a traceback.

The `clip-diffusionlm` command and the `examples/*.py` scripts run their main function through [`run_cli`]. The
package reports bad input (a wrong path, an unknown column, a corrupt or missing image, a file that is not UTF-8, an
invalid flag value) as a `ValueError` or an `OSError` naming the file or flag and the fix, and raises them before
anything is written, so the message is all the user needs. Any other exception is a bug and keeps its traceback.
`--debug` (anywhere on the command line) or `CLIP_DIFFUSIONLM_DEBUG=1` shows the traceback of user errors too.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["DEBUG_ENV", "DEBUG_FLAG", "USER_ERRORS", "InterruptedCleanly", "run_cli"]

DEBUG_FLAG = "--debug"
DEBUG_ENV = "CLIP_DIFFUSIONLM_DEBUG"
EXIT_USER_ERROR = 2
# ValueError covers UnicodeDecodeError and json.JSONDecodeError; OSError covers missing files, permissions and
# PIL.UnidentifiedImageError. TypeError and RuntimeError are left alone: from a command line they mean a bug.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


class InterruptedCleanly(KeyboardInterrupt):
    """An interrupt (SIGINT/SIGTERM) that the interrupted code has already made safe, e.g. training saved a
    checkpoint to resume from. It unwinds the callers like any interrupt, so that a script does not go on with work
    that was not finished; a command line ends with its message and exit status 0."""


def _debug_requested(argv: Sequence[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")


def run_cli(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> int:
    """
    Runs a command-line entry point and turns user errors into a short message.

    Args:
        main (`Callable[[list[str]], Any]`):
            The entry point; takes the arguments (without `--debug`) and returns an exit status, or anything else
            (e.g. an output folder) for success.
        argv (`Sequence[str]`, *optional*):
            The arguments; defaults to `sys.argv[1:]`.

    Returns:
        `int`: The exit status: `main`'s, 0 for success, 2 for a user error (the argument parser's own status for a
        bad flag or `--help`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    try:
        status = main([argument for argument in argv if argument != DEBUG_FLAG])
    except USER_ERRORS as error:
        if debug:
            traceback.print_exc()
        message = str(error) or type(error).__name__
        hint = "" if debug else f" (run with {DEBUG_FLAG} or {DEBUG_ENV}=1 for the traceback)"
        print(f"error: {message}{hint}", file=sys.stderr)
        return EXIT_USER_ERROR
    except InterruptedCleanly as interrupt:
        print(f"interrupted: {interrupt}", file=sys.stderr)
        return 0
    except SystemExit as exit_request:
        # The argument parsers (argparse, HfArgumentParser) exit after printing usage errors and `--help`: their
        # status (2 or 0) is the entry point's status, returned like any other instead of unwinding the caller.
        return exit_request.code if isinstance(exit_request.code, int) else EXIT_USER_ERROR
    return status if isinstance(status, int) else 0
