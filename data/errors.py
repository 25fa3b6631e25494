"""How a user-facing error becomes its one line (README: exit codes).

Every command catches its typed errors (StoreError and the jobs' own) and OSError (a full disk,
a read-only store, a missing permission: the user's to fix too), prints this line on stderr and
exits 1. A traceback is for bugs only.
"""
from __future__ import annotations


def error_line(e: BaseException) -> str:
    """The message of a user-facing error; an OSError names its file and the system's reason."""
    if isinstance(e, OSError):
        return f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"
    return str(e)
