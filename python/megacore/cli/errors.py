"""How every `megacore` command reports a user's mistake or the machine's: one ``error:`` line per line of the
message on stderr, exit status 1, no traceback."""

from __future__ import annotations

import sys


def error_line(e: BaseException) -> str:
    """The text after ``error:`` for an exception a user's mistake or the machine caused: the message
    itself, without the ``[Errno N]`` prefix of an OSError."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f": {e.filename}" if e.filename else "")
    return str(e)


def print_error(e: BaseException) -> int:
    """Prints ``error: ...`` (one line per line of the message) to stderr; returns the exit status 1."""
    for line in error_line(e).splitlines() or [type(e).__name__]:
        print(f"error: {line}", file=sys.stderr)
    return 1
