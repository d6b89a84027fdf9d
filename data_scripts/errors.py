"""User errors end a command with one line, ``error: <what was wrong and what to do>``, and exit code 1.

Errors a user can cause are raised as ``ValueError`` / ``FileNotFoundError`` (and `HubError` for
the Hub) with a message that says what to do; `run_main` prints those as one line. Anything else
is a bug and keeps its traceback. Set ``FLOWER_VIT_LENS_TRACEBACK=1`` to see the traceback of a
user error too.
"""
import os
import sys
from typing import Callable, List, Optional

from .hub import HubError

TRACEBACK_ENV = 'FLOWER_VIT_LENS_TRACEBACK'
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, HubError)


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message is joined with spaces)."""
    return ' '.join(str(error).split()) or type(error).__name__


def run_main(main: Callable[[Optional[List[str]]], object], argv: Optional[List[str]] = None) -> int:
    """Runs a command's ``main(argv)``; a user error becomes one ``error:`` line on stderr and exit code 1.

    Returns:
        the exit code: 0, or 1 after a user error.
    """
    try:
        main(argv)
    except USER_ERRORS as e:
        if os.environ.get(TRACEBACK_ENV, '') not in ('', '0'):
            raise
        print(f'error: {one_line(e)}', file=sys.stderr)
        return 1
    return 0
