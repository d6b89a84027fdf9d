"""User errors end a command with one line, ``error: <what was wrong and what to do>``, and exit code 1.

A mistake the user can fix (a bad flag, a missing folder, an unreadable image with
``--strict_images``, a wrong base, no Hub token) is raised as a `UserError` whose message says
what to do; `run_main` prints it as one line. Anything else, a ``ValueError`` from numpy,
scikit-learn or PIL included, is a bug and keeps its traceback. Set ``FLOWER_VIT_LENS_TRACEBACK=1``
to see the traceback of a user error too.

`UserError` is a ``ValueError`` (and `MissingFileError` a ``FileNotFoundError``), so code that
catches the built-in types, as callers of a library do, keeps working.
"""
import os
import sys
from typing import Callable, List, Optional

TRACEBACK_ENV = 'FLOWER_VIT_LENS_TRACEBACK'


class UserError(ValueError):
    """A mistake the user can fix; the message says what to do."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class NotAFolderError(UserError, NotADirectoryError):
    """The user named a file where a folder is needed."""


def one_line(error: BaseException) -> str:
    """The error's message on one line (a multi-line message is joined with spaces)."""
    return ' '.join(str(error).split()) or type(error).__name__


def run_main(main: Callable[[Optional[List[str]]], object], argv: Optional[List[str]] = None) -> int:
    """Runs a command's ``main(argv)``; a `UserError` becomes one ``error:`` line on stderr and exit code 1.

    Returns:
        the exit code: 0, or 1 after a user error.
    """
    try:
        main(argv)
    except UserError as e:
        if os.environ.get(TRACEBACK_ENV, '') not in ('', '0'):
            raise
        print(f'error: {one_line(e)}', file=sys.stderr)
        return 1
    return 0
