"""Claims: how any number of `tmkd-label run` workers share one store with no coordinator.

Before scoring a work unit (teacher × corpus part) a worker claims it by creating
``STORE/claims/<teacher>/<corpus>/part-NNNNN.claim`` if, and only if, it does not exist:
the claim is written complete under a temporary name and hard-linked into place, which
fails when the name is taken (atomic on local disks and NFS alike). The claim is a lease:
its owner touches it (mtime) every ``lease / 4`` seconds from a background thread, and a
claim untouched for ``lease`` seconds belongs to a dead worker (so does, at once, a claim
whose process on this same host no longer exists). Another worker takes it over by
renaming it away (only one rename can win) and claiming afresh.

Temporary files carry their claim's token in their name, so the owner of a unit can remove
every other temporary of that unit: they belong to claims that have expired. Before its
commit a worker checks it still holds the claim; if it lost it (it stalled past its
lease), it drops its result instead of committing over the new owner's.

On an object store (s3://, gs://) the same protocol uses conditional PUTs instead of links
and renames: a claim is created with ``If-None-Match: *``; its owner renews it by rewriting it
with ``If-Match`` on the version it last wrote (the object's modification time is the lease
clock); a takeover rewrites an expired claim with ``If-Match`` on the version it read, so of
several workers taking over at once exactly one succeeds. There are no temporaries.

Known limits: a takeover reads the claim's age, then renames it; a claim renewed or re-made
in between can be moved away, and its owner then drops its (identical) result: work is
repeated, never lost or committed twice. Nodes sharing a store must have distinct host names
(a claim of a dead process on the *same* host is taken over without waiting for its lease).
"""
from __future__ import annotations

import json
import math
import os
import re
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from tmkd.data.fs import ObjectPath, read_record_text
from tmkd.data.store import PART_RE, Store, StoreError, create_json_if_absent, part_name

DEFAULT_LEASE_S = 120.0
MIN_OBJECT_LEASE_S = 5.0  # an object's Last-Modified time has a resolution of one second


class ClaimLost(StoreError):
    """Another worker took over this unit (our lease expired): our result is dropped, not committed."""


class Claims:
    """The claims one worker holds, with a thread that renews their leases."""

    def __init__(self, store: Store, lease_s: float = DEFAULT_LEASE_S):
        if not (math.isfinite(lease_s) and 1e-3 <= lease_s <= 7 * 86400):
            raise StoreError(f"--lease {lease_s}: must be a number of seconds between 0.001 and 604800 (a week)")
        if isinstance(store.root, ObjectPath) and lease_s < MIN_OBJECT_LEASE_S:
            raise StoreError(f"--lease {lease_s:g}: on an object store a lease must be at least "
                             f"{MIN_OBJECT_LEASE_S:g} s (its clock is the objects' Last-Modified time, to the second)")
        self.store, self.lease_s = store, float(lease_s)
        self.token = uuid.uuid4().hex  # this worker's identity in claims and temporaries
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token}
        self.held: set[Path] = set()
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def path(self, teacher: str, corpus: str, part: int) -> Path:
        return self.store.root / "claims" / teacher / corpus / part_name(part).replace(".parquet", ".claim")

    # ---- claim, renew, release ------------------------------------------------------------
    def try_claim(self, teacher: str, corpus: str, part: int) -> bool:
        """Claim the unit if nobody holds a live claim on it. True if it is now ours."""
        path = self.path(teacher, corpus, part)
        if isinstance(path, ObjectPath):
            return self._try_claim_object(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after taking over an expired claim
            claim = {**self.owner, "claimed_at": time.time(), "lease_s": self.lease_s}
            if create_json_if_absent(path, claim, self.token):  # atomic create-if-absent, with complete content
                with self.lock:
                    self.held.add(path)
                return True
            if not self._take_over_if_expired(path):
                return False
        return False

    def _claim_bytes(self) -> bytes:
        return json.dumps({**self.owner, "claimed_at": time.time(), "lease_s": self.lease_s}).encode()

    def _try_claim_object(self, path: ObjectPath) -> bool:
        """Create the claim if absent; else take it over if it expired, by a conditional overwrite of
        the very version whose age we read (one of several workers wins)."""
        if not path.create(self._claim_bytes()):
            head = path.head()
            if head is not None and (self._age(path, head) < self._lease_of(path) and not self._owner_is_dead(path)):
                return False
            if head is None or not path.put_if(self._claim_bytes(), head):
                return False  # released meanwhile (the next pass claims it), or another worker won
        with self.lock:
            self.held.add(path)
        return True

    @staticmethod
    def _age(path, head: dict | None = None) -> float:
        """Seconds since the claim was last written or renewed (FileNotFoundError if it is gone)."""
        if isinstance(path, ObjectPath):
            head = head or path.head()
            if head is None:
                raise FileNotFoundError(str(path))
            return time.time() - head["last_modified"].timestamp()
        return time.time() - path.stat().st_mtime

    def _lease_of(self, path: Path) -> float:
        """The lease its owner asked for (recorded in the claim): a short-lease worker must not take
        over the units of a long-lease one early."""
        info = self.owner_of(path) or {}
        lease = info.get("lease_s")
        return float(lease) if isinstance(lease, (int, float)) and math.isfinite(lease) and lease > 0 else self.lease_s

    def _take_over_if_expired(self, path: Path) -> bool:
        """Move an expired claim (or one whose process on this host is gone) out of the way; True if
        we did, and may claim afresh."""
        try:
            age = self._age(path)
        except FileNotFoundError:
            return True  # released meanwhile
        if age < self._lease_of(path) and not self._owner_is_dead(path):
            return False
        grave = path.parent / f".{path.name}.{self.token}.expired"
        try:
            os.rename(path, grave)  # of several workers taking over at once, one rename wins
        except FileNotFoundError:
            return False
        grave.unlink(missing_ok=True)
        return True

    def _owner_is_dead(self, path: Path) -> bool:
        """A claim of a process on this host that no longer exists need not wait for its lease (a
        re-run after kill -9 starts at once). Other hosts' claims wait for the lease to expire."""
        info = self.owner_of(path)
        if not info or info.get("host") != self.owner["host"] or info.get("token") == self.token:
            return False
        try:
            os.kill(int(info["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, KeyError, TypeError):
            return False
        return False

    def owner_of(self, path: Path) -> dict | None:
        try:
            info = json.loads(read_record_text(path))
        except (FileNotFoundError, ValueError):
            return None
        return info if isinstance(info, dict) else None

    def holds(self, teacher: str, corpus: str, part: int) -> bool:
        info = self.owner_of(self.path(teacher, corpus, part))
        return info is not None and info.get("token") == self.token

    def check_held(self, teacher: str, corpus: str, part: int) -> None:
        """Raise ClaimLost unless we still hold this unit (called right before committing)."""
        if not self.holds(teacher, corpus, part):
            raise ClaimLost(f"lost the claim on {teacher} × {corpus}/{part} to another worker (this worker did "
                            f"not renew its {self.lease_s:g} s lease in time); its result is dropped, the other "
                            "worker commits it")

    def release(self, teacher: str, corpus: str, part: int) -> None:
        path = self.path(teacher, corpus, part)
        with self.lock:
            self.held.discard(path)
        if self.holds(teacher, corpus, part):
            path.unlink(missing_ok=True)

    def is_live(self, teacher: str, corpus: str, part: int) -> bool:
        """Does any worker hold a live claim on this unit?"""
        path = self.path(teacher, corpus, part)
        try:
            age = self._age(path)
        except FileNotFoundError:
            return False
        return age < self._lease_of(path) and not self._owner_is_dead(path)

    def renew(self) -> None:
        """Touch every claim we hold; forget the ones another worker took over."""
        with self.lock:
            held = list(self.held)
        for path in held:
            if isinstance(path, ObjectPath):
                if not self._renew_object(path):
                    with self.lock:
                        self.held.discard(path)
                continue
            info = self.owner_of(path)
            if info is None or info.get("token") != self.token:
                with self.lock:
                    self.held.discard(path)
                continue
            try:
                os.utime(path)
            except FileNotFoundError:
                pass

    def _renew_object(self, path: ObjectPath) -> bool:
        """Rewrite our claim if it is still the version we read as ours (its time is the lease clock)."""
        try:
            data, tag = path.read_tagged()
            info = json.loads(data)
        except (FileNotFoundError, ValueError):
            return False
        if not isinstance(info, dict) or info.get("token") != self.token:
            return False
        return path.put_if(json.dumps({**info, "renewed_at": time.time()}).encode(), tag)

    # ---- the renewal thread ---------------------------------------------------------------
    def __enter__(self) -> "Claims":
        def loop():
            warned = False
            while not self._stop.wait(self.lease_s / 4):
                try:
                    self.renew()
                except Exception as e:  # a transient store error must not end the renewals for good
                    if not warned:
                        print(f"warning: renewing claims failed ({type(e).__name__}: {e}); retrying", file=sys.stderr)
                        warned = True

        self._thread = threading.Thread(target=loop, name="tmkd-claims", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self.lock:
            held = list(self.held)
        for path in held:  # release what we still hold (a failed run leaves its units to others now)
            info = self.owner_of(path)
            if info is not None and info.get("token") == self.token:
                path.unlink(missing_ok=True)
        with self.lock:
            self.held.clear()


TEMP_PART = re.compile(r"^\.part-(\d{5})\.")  # ".part-00003.parquet.<token>.tmp", ".part-00003.commit.json..."


def remove_dead_temporaries(store: Store, claims: Claims) -> int:
    """Delete temporaries whose unit has no live claim: their writers are gone. Returns the count.
    Covers label parts, commit records and claims themselves (a worker killed while claiming). On an
    object store there are no temporaries: what a dead writer leaves is a data object no commit record
    names, beside the one that is named (a unit with one object is scored, and cleaned, by `run`)."""
    if isinstance(store.root, ObjectPath):
        return _remove_unnamed_objects(store, claims)
    n = 0
    for folder in ("labels", "claims"):
        base = store.root / folder
        for tmp in base.glob("*/*/.part-*.tmp") if base.exists() else []:
            match = TEMP_PART.match(tmp.name)
            if match and not claims.is_live(tmp.parent.parent.name, tmp.parent.name, int(match.group(1))):
                try:
                    if folder == "claims" and time.time() - tmp.stat().st_mtime < claims.lease_s:
                        continue  # a claim being written right now
                except FileNotFoundError:
                    continue  # its owner finished with it meanwhile
                tmp.unlink(missing_ok=True)
                n += 1
    return n


def _remove_unnamed_objects(store: Store, claims: Claims) -> int:
    units: dict[tuple, list] = {}
    for f in store.label_files():
        match = PART_RE.match(f.name)
        if match:
            units.setdefault((f.parent.parent.name, f.parent.name, int(match.group(1))), []).append(f)
    n = 0
    for (teacher, corpus, part), files in units.items():
        if len(files) < 2 or claims.is_live(teacher, corpus, part):
            continue
        try:
            record = store.label_commit(teacher, corpus, part)
        except StoreError:
            continue  # an unreadable record: `run` re-scores the unit, and cleans it then
        named = store.label_data_path(teacher, corpus, part, record) if record else None
        for f in files:
            if f != named:
                f.unlink(missing_ok=True)
                n += 1
    return n
