"""How a user-facing error becomes its one line (README: exit codes).

Every command catches its typed errors (StoreError and the jobs' own) and OSError (a full disk,
a read-only store, a missing permission: the user's to fix too), prints this line on stderr and
exits 1. A traceback is for bugs only.
"""
from __future__ import annotations

import re

# scheme://anything@ (user, key, secret: a secret may hold '/', ':' and '@', so up to the token's last '@'), and the
# one-slash typos s3:/KEY@ and s3:KEY@
_CREDENTIALS = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]+:/{0,2})[^\s'\"]*@")


def without_credentials(text: str) -> str:
    """``text`` with any credentials in a URI shown as ``***``: ``s3://KEY:SECRET@bucket/p`` -> ``s3://***@bucket/p``.
    Every message a command prints goes through this, whatever error or --set echoed the URI."""
    return _CREDENTIALS.sub(r"\1***@", text)


def error_line(e: BaseException) -> str:
    """The message of a user-facing error; an OSError names its file and the system's reason."""
    if isinstance(e, OSError):
        return without_credentials(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    return without_credentials(str(e))
