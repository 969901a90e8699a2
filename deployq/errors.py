"""One error type for everything a user can get wrong, printed by the CLI as one line with a documented exit code.

Exit codes (the same for every command):

- 0: success
- 1: an internal error (a bug in deployq: please report it)
- 2: usage (bad or missing command-line options)
- 3: bad input (a model, scale file, config list, image folder, npz, saved net or output path that cannot be used;
  also any other ``ValueError`` a part of deployq raises on a value it was given)
- 4: verification breach (``deployq verify`` ran, and the export misses its thresholds)
- 5: a distributed run lost a worker, server or its scheduler (``deployq.dist``; ``--resume`` continues)
- 130: interrupted (Ctrl-C; nothing half-written is left behind)
"""

from __future__ import annotations

from os import PathLike

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3
EXIT_VERIFY = 4
EXIT_INTERRUPTED = 130


class DeployqError(Exception):
    """A problem the user can fix. ``where`` names the file / layer / op; ``fix`` says what to do instead.

    ``str(err)`` is the one line the CLI prints: ``<where>: <message> (<fix>)``.
    """

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, *, where: str | PathLike | None = None, fix: str | None = None) -> None:
        self.message = message
        self.where = None if where is None else str(where)
        self.fix = fix
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        return f"{text} ({self.fix})" if self.fix else text


class UsageError(DeployqError):
    """Bad or missing command-line options (exit 2)."""

    exit_code = EXIT_USAGE


class InputError(DeployqError):
    """A file, folder or value that cannot be used as given (exit 3)."""

    exit_code = EXIT_BAD_INPUT


class VerificationError(DeployqError):
    """An export ran but missed its verification thresholds (exit 4)."""

    exit_code = EXIT_VERIFY


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the command needs does not exist (exit 3; also a FileNotFoundError for Python callers)."""

    def __init__(self, message: str, *, where: str | PathLike | None = None, fix: str | None = None) -> None:
        InputError.__init__(self, message, where=where, fix=fix)


def short_message(e: BaseException, limit: int = 200) -> str:
    """The line of an exception's text that says what went wrong: MXNet's messages start with
    ``Traceback (most recent call last):`` and C++ frames, which are skipped; the exception's type if empty."""
    skip = ("Traceback (most recent call last)", "File ", "Stack trace", "[bt]")
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and not ln.strip().startswith(skip)]
    return (lines[0] if lines else type(e).__name__)[:limit]
