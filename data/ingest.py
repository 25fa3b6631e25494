"""Ingest: source files -> checked, id'd corpus parts in the store, committed all at once.

The flow for one ``ingest`` call:

1. open each file with its reader (``data.readers``), which streams raw records;
2. check every record (missing field, empty text, undecodable bytes, unknown label),
   give it its stable id, and drop duplicate ids (within this ingest and against the
   corpus already in the store);
3. write the good rows into parts of ``part_rows`` rows as they come (memory stays flat);
   bad rows go to a quarantine JSONL file with file, line, field and reason, or, with
   ``strict``, the first one stops the ingest;
4. commit every new part in one manifest rename (``Store.commit_corpus_parts``).

Any error before step 4 deletes the parts written so far, so the store is exactly as it
was: a part that is not in the manifest never counts, and none is left lying around.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import unicodedata
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tmkd.data.readers import FIELDS, FORMATS, Chunk, Reader, ReaderError, Record, nli_label_names, open_reader
from tmkd.data.fs import ObjectPath, read_record_text
from tmkd.data.store import CORPUS_SCHEMA, CorpusPart, Store, StoreError, check_name, create_json_if_absent

CHUNK_ROWS = 8192  # records checked together (duplicate checks are vectorised per chunk)
# a text that str.strip() empties, as an RE2 pattern for Arrow (every character str.isspace() knows)
BLANK = "^[" + "".join(f"\\x{{{c:x}}}" for c in range(0x3001) if chr(c).isspace()) + "]*$"
ID_MODES = ("source", "text")
_INT_RE = re.compile(r"-?(0|[1-9][0-9]*)\Z")
_KEYS = ("label", "group", "id")  # an empty value here is a missing one (an empty text is "empty text")


class IngestError(Exception):
    """A user-facing ingest problem (bad options, unreadable file, a bad row under --strict)."""


@dataclass
class IngestOptions:
    """What ``tmkd-label ingest`` was asked to do."""

    format: str  # one of data.readers.FORMATS
    corpus: str
    columns: dict[str, str] = field(default_factory=dict)  # corpus field -> source column/key
    label_names: list[str] | None = None  # the label space, in index order
    label_map: dict[str, str] = field(default_factory=dict)  # raw label value -> label name; defines the
    #   names when label_names is None and the format has none that hold its targets (names_from_map)
    unlabeled: bool = False  # ignore any label column: labels are null
    part_rows: int = 50_000
    strict: bool = False  # the first bad row is an error and nothing is committed
    ids: str = "source"  # "source": the source's id where it has one, else a text hash; "text": always the text hash
    positive_label: str | None = None  # the corpus's positive class (a label name); default: the format's, if any


@dataclass
class IngestSummary:
    corpus: str
    files: list[str]
    label_names: list[str] | None
    rows_read: int
    rows_written: int
    rows_labelled: int
    parts: list[int]  # the part numbers this ingest added
    bad: dict[str, int]  # reason -> count
    quarantine: Path | None  # the quarantine file, if any row was bad
    seconds: float
    positive_label: str | None = None  # the positive label the corpus declares after this ingest

    @property
    def rows_per_second(self) -> float:
        return self.rows_read / self.seconds if self.seconds > 0 else 0.0


Progress = Callable[[Path, int, int], None]  # (file, bytes done, bytes total)


def ingest(store: Store, files: list[Path], opts: IngestOptions, progress: Progress | None = None) -> IngestSummary:
    """Ingest ``files`` into corpus ``opts.corpus`` of ``store``; all or nothing is committed."""
    _check_options(opts)
    with _store_lock(store):
        job = _Ingest(store, opts)
        try:
            for path in files:
                job.read(Path(path), progress)
            return job.commit()
        except BaseException:
            job.discard()
            raise
        finally:
            job.existing.close()
            job.seen.close()


def parse_mapping(text: str | None, option: str) -> dict[str, str]:
    """``"a=b,c=d"`` -> ``{"a": "b", "c": "d"}`` (the --columns and --label-map syntax)."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise IngestError(f"{option}: expected key=value pairs separated by commas, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def parse_names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",")] if text else None


def names_from_map(label_map: dict[str, str], candidates: Iterable[list[str] | None] = ()) -> list[str]:
    """The label names a --label-map defines when --label-names is not given.

    The first of ``candidates`` (the format's own label space, then the corpus's in the store)
    that holds every target of the map, so its order is kept; else the standard NLI space the
    targets come from ([entailment, not_entailment] or [entailment, neutral, contradiction]);
    else the targets themselves: in numeric order if all are integers (``yes=1,no=0`` gives
    [0, 1], so 1 stays index 1), otherwise in the order the map first names them.
    """
    targets = list(dict.fromkeys(label_map.values()))
    for names in candidates:
        if names and set(targets) <= set(names):
            return list(names)
    standard = nli_label_names(set(targets))
    if standard:
        return list(standard)
    if all(_INT_RE.match(t) for t in targets):
        return sorted(targets, key=int)
    return targets


# ---- ids ---------------------------------------------------------------------------------------


def _hash64(text: str, domain: bytes) -> int:
    """A signed 64-bit hash, the same on every machine (unlike Python's ``hash``)."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=domain).digest()
    return int.from_bytes(digest, "big", signed=True)


def source_row_id(source_id: str) -> int:
    """The source's id as the row id: itself if a canonical int64, else its 64-bit hash."""
    if _INT_RE.match(source_id):
        value = int(source_id)
        if -(2**63) <= value < 2**63:
            return value
    return _hash64(source_id, b"tmkd/source-id")


def normalise(text: str) -> str:
    """NFC, whitespace runs collapsed to one space, stripped: what makes two texts 'the same'."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def text_pair_id(text_a: str, text_b: str) -> int:
    return _hash64(normalise(text_a) + "\t" + normalise(text_b), b"tmkd/text-pair")


MERGE_BLOCK = 1 << 16  # ids read from each run at a time while merging (0.5 MB)
HASH_BLOCK = 1 << 16  # ids hashed into a filter at a time (each probe's temporaries: 0.5 MB)


class IdSet:
    """A set of int64 ids whose memory stays flat as it grows.

    The ids go to disk in sorted runs (raw int64 files in a temporary folder outside the store,
    removed by ``close``), merged like a binary counter: two runs of one size become one of twice
    the size, so there are at most log2(ids / RUN_IDS) + 1 of them. In memory: the ids of the run
    being filled (at most ``RUN_IDS``: 2 MB) and one Bloom filter per run (10 bits per id, ~2% false
    positives). A lookup asks each run's filter; only its positives (the real duplicates, and ~2%
    of the rest) are searched in that run, memory-mapped for the search alone, so the pages it
    touches are not kept. At 10M ids that is ~10 MB of filters where a set in memory takes 80 MB
    (8 bytes per id) and grows with the corpus. Merges read and write in blocks of ``MERGE_BLOCK``.
    """

    RUN_IDS = 1 << 18

    def __init__(self) -> None:
        self.filters: list[_Bloom] = []  # filters[j] holds the ids of runs[j]; the last one, with no run yet: pending
        self.pending = _SortedRuns()  # ids of the run being filled
        self.runs: list[tuple[Path, int]] = []  # (file, ids), sizes decreasing
        self.folder: Path | None = None
        self._files = 0

    def contains(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        hit = np.zeros(len(ids), dtype=bool)
        h1, h2 = _Bloom.hashes(ids)
        for j, f in enumerate(self.filters):
            at = np.flatnonzero(f.contains(h1, h2) & ~hit)
            if not len(at):
                continue
            candidates = ids[at]
            if j < len(self.runs):
                path, n = self.runs[j]
                run = np.memmap(path, dtype=np.int64, mode="r", shape=(n,))
                pos = np.minimum(np.searchsorted(run, candidates), n - 1)
                hit[at] = np.asarray(run[pos]) == candidates
                del run  # unmapped: the pages the search touched leave this process
            else:
                hit[at] = self.pending.contains(candidates)
        return hit

    def add(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        h1, h2 = _Bloom.hashes(ids)
        start = 0
        while start < len(ids):
            if len(self.filters) == len(self.runs):  # a new run begins
                self.filters.append(_Bloom(self.RUN_IDS))
            end = start + min(len(ids) - start, self.RUN_IDS - self.pending.count)
            self.filters[-1].add(h1[start:end], h2[start:end])
            self.pending.add(ids[start:end])
            start = end
            if self.pending.count >= self.RUN_IDS:
                self._write_run()

    def _new_file(self) -> Path:
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="tmkd-ingest-ids-"))
        self._files += 1
        return self.folder / f"run-{self._files:05d}.i64"

    def _write_run(self) -> None:
        path = self._new_file()
        run = self.pending.merged()
        run.tofile(path)
        self.runs.append((path, len(run)))
        self.pending = _SortedRuns()
        while len(self.runs) > 1 and self.runs[-1][1] >= self.runs[-2][1]:  # like a binary counter
            (a, na), (b, nb) = self.runs[-2:]
            del self.filters[-2:]  # rebuilt from the ids by the merge: never two copies in memory
            path, f = self._merge(a, na, b, nb)
            self.runs[-2:] = [(path, na + nb)]
            self.filters.append(f)
            a.unlink()
            b.unlink()

    def _merge(self, a: Path, na: int, b: Path, nb: int) -> tuple[Path, "_Bloom"]:
        """Merge two sorted runs into a new one, reading and writing blocks of RUN_IDS ids (plain reads, no
        mapping: memory stays at a few blocks), and build its filter on the way."""
        out, f = self._new_file(), _Bloom(na + nb)
        i = j = 0
        with open(out, "wb") as w:
            while i < na or j < nb:
                xa = np.fromfile(a, np.int64, count=min(MERGE_BLOCK, na - i), offset=8 * i)
                xb = np.fromfile(b, np.int64, count=min(MERGE_BLOCK, nb - j), offset=8 * j)
                # everything up to the smaller of the two blocks' last ids can be written: nothing after it is smaller
                limit = min(x[-1] for x in (xa, xb) if len(x))
                ka, kb = np.searchsorted(xa, limit, side="right"), np.searchsorted(xb, limit, side="right")
                merged = np.sort(np.concatenate([xa[:ka], xb[:kb]]), kind="mergesort")
                for k in range(0, len(merged), HASH_BLOCK):  # the hashes' temporaries stay small
                    f.add(*_Bloom.hashes(merged[k:k + HASH_BLOCK]))
                merged.tofile(w)
                i, j = i + ka, j + kb
        return out, f

    def close(self) -> None:
        """Remove the runs on disk; the set is empty after."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder, self.runs, self.filters, self.pending = None, [], [], _SortedRuns()


class _SortedRuns:
    """The ids of the run being filled: sorted numpy runs merged like a binary counter (vectorised lookups,
    amortised O(n log n) inserts)."""

    def __init__(self) -> None:
        self.runs: list[np.ndarray] = []
        self.count = 0

    def contains(self, ids: np.ndarray) -> np.ndarray:
        hit = np.zeros(len(ids), dtype=bool)
        for run in self.runs:
            pos = np.minimum(np.searchsorted(run, ids), len(run) - 1)
            hit |= run[pos] == ids
        return hit

    def add(self, ids: np.ndarray) -> None:
        run = np.sort(ids)
        self.count += len(run)
        while self.runs and len(self.runs[-1]) <= len(run):
            run = np.sort(np.concatenate([self.runs.pop(), run]), kind="mergesort")
        if len(run):
            self.runs.append(run)

    def merged(self) -> np.ndarray:
        if len(self.runs) == 1:  # the usual case: full chunks add up to one run, so nothing is copied
            return self.runs[0]
        return np.sort(np.concatenate(self.runs)) if self.runs else np.zeros(0, np.int64)


class _Bloom:
    """A Bloom filter for ``capacity`` int64 ids, blocked by 64-bit word: each id sets ``PROBES`` bits of one
    word, so a lookup or an insert is one memory access per id (10 bits per id: 1.9% false positives, measured)."""

    PROBES = 6
    BITS_PER_ID = 10

    def __init__(self, capacity: int) -> None:
        self.words = np.zeros(max(1, capacity * self.BITS_PER_ID // 64), dtype=np.uint64)

    @staticmethod
    def hashes(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Two 64-bit hashes per id (splitmix64 finalizers), so that sequential ids spread over the bits."""
        def mix(x):
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            return x ^ (x >> np.uint64(31))
        with np.errstate(over="ignore"):
            x = ids.view(np.uint64)
            return mix(x + np.uint64(0x9E3779B97F4A7C15)), mix(x ^ np.uint64(0xD6E8FEB86659FD93))

    def _word_and_mask(self, h1: np.ndarray, h2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mask = np.zeros(len(h2), dtype=np.uint64)
        for i in range(self.PROBES):  # 6 bits of h2 per probe choose a bit of the word
            mask |= np.uint64(1) << ((h2 >> np.uint64(6 * i)) & np.uint64(63))
        return h1 % np.uint64(len(self.words)), mask

    def contains(self, h1: np.ndarray, h2: np.ndarray) -> np.ndarray:
        word, mask = self._word_and_mask(h1, h2)
        return (self.words[word] & mask) == mask

    def add(self, h1: np.ndarray, h2: np.ndarray) -> None:
        word, mask = self._word_and_mask(h1, h2)
        self.words[word] |= mask  # of two ids of this batch in one word only one write lands:
        lost = (self.words[word] & mask) != mask
        if lost.any():  # rare: set those exactly
            np.bitwise_or.at(self.words, word[lost], mask[lost])


# ---- labels ------------------------------------------------------------------------------------


class LabelSpace:
    """Raw label value -> label index.

    The value (after --label-map) matches a label name first; failing that, an integer
    in range is the index itself (RTE's 0/1, WikiQA's 0/1 under names of your own).
    """

    def __init__(self, names: list[str], label_map: dict[str, str]):
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}
        self.map = label_map
        for raw, target in label_map.items():
            if self._lookup(target) is None:
                raise IngestError(f"--label-map {raw}={target}: {target!r} is not one of the label names {names}")

    def _lookup(self, key: str) -> int | None:
        if key in self.index:
            return self.index[key]
        if _INT_RE.match(key) and 0 <= int(key) < len(self.names):
            return int(key)
        return None

    def lookup(self, raw: object) -> int | None:
        if isinstance(raw, bool):
            key = str(int(raw))
        elif isinstance(raw, float) and raw.is_integer():
            key = str(int(raw))
        else:
            key = str(raw).strip()
        return self._lookup(self.map.get(key, key))


# ---- the ingest job ----------------------------------------------------------------------------


class _Bad(Exception):
    """One bad row: (field, reason, detail)."""


class _Row(NamedTuple):  # fields in CORPUS_SCHEMA order
    id: int
    text_a: str
    text_b: str
    label: int | None
    group: str | None
    source_id: str | None


class _Ingest:
    """The state of one ingest: label space, ids seen, parts written, bad rows."""

    def __init__(self, store: Store, opts: IngestOptions):
        self.store, self.opts = store, opts
        self.label_names: list[str] | None = None
        self.names_from = ""
        self.labels: LabelSpace | None = None
        self.positive: str | None = None  # the positive label this ingest declares (None: none, or keep the corpus's)
        self.declared: str | None = None  # the positive label the corpus in the store already declares
        self.existing, self.seen = IdSet(), IdSet()
        try:
            if store.has_corpus(opts.corpus):
                m = store.corpus(opts.corpus)
                self._set_label_names(m.label_names, f"corpus {opts.corpus!r} in the store")
                self.declared = m.positive_label
                for part in m.parts:
                    self.existing.add(store.read_corpus_part(part, ["id"]).column("id").to_numpy())
            self.dirs_before = {d: d.exists() for d in self._dirs()}
            self.writer = _PartWriter(store, opts.corpus, store.next_part_number(opts.corpus), opts.part_rows)
            self.quarantine = _Quarantine(store, opts.corpus)
        except BaseException:  # no job to discard yet: only the id sets' runs to remove
            self.existing.close()
            self.seen.close()
            raise
        self.files: list[str] = []
        self.rows_read = self.rows_written = self.rows_labelled = 0
        self.started = time.perf_counter()

    def _dirs(self) -> list[Path]:
        q = self.store.quarantine_path(self.opts.corpus).parent
        return [self.store.corpus_dir(self.opts.corpus), q, q.parent]

    # -- label space
    def _set_label_names(self, names: list[str] | None, source: str) -> None:
        if names is not None:
            self.label_names, self.names_from = list(names), source
            self.labels = LabelSpace(self.label_names, self.opts.label_map)

    def _resolve_labels(self, reader: Reader) -> bool:
        """Settle the file's label space (and positive label) against the corpus's; return whether its labels are read.

        The names: --label-names; else the format's own (WikiQA, GLUE, NLI samples) or, with
        --label-map, the names the map defines (``names_from_map``); else the corpus's.
        """
        labelled = reader.has_label and not self.opts.unlabeled
        names = self.opts.label_names
        if names is None and not self.opts.unlabeled:
            names = reader.label_names
            if self.opts.label_map:
                names = names_from_map(self.opts.label_map, [reader.label_names, self.label_names])
        if names is None:  # the file does not say: it takes the corpus's (an unlabeled file fits any)
            if labelled and self.label_names is None:
                raise IngestError(
                    f"{reader.path}: the label space is unknown: pass --label-names NAME,NAME,... "
                    "(in index order), or --label-map RAW=NAME,..., or --unlabeled"
                )
        elif self.label_names is None:
            self._set_label_names(names, str(reader.path))
        elif names != self.label_names:
            raise IngestError(
                f"{reader.path}: label names {names} differ from {self.label_names} of {self.names_from}; "
                "use the same label names (--label-names) or another corpus"
            )
        self._resolve_positive(reader)
        return labelled

    def _resolve_positive(self, reader: Reader) -> None:
        """--positive-label, checked against the label names; else the format's default, unless the corpus has one."""
        wanted = self.opts.positive_label
        if wanted is not None:
            if self.label_names is None:
                raise IngestError(f"--positive-label {wanted}: the corpus has no label names; "
                                  "pass --label-names NAME,NAME,... as well")
            if wanted not in self.label_names:
                raise IngestError(f"--positive-label {wanted}: not one of the label names {self.label_names}")
            if self.declared not in (None, wanted):
                raise IngestError(f"--positive-label {wanted}: corpus {self.opts.corpus!r} in the store "
                                  f"declares positive label {self.declared!r}; use that one or another corpus")
            self.positive = wanted
        elif (self.positive is None and self.declared is None and self.label_names is not None
              and reader.positive_label in self.label_names):
            self.positive = reader.positive_label

    # -- reading
    def read(self, path: Path, progress: Progress | None) -> None:
        try:
            reader = open_reader(self.opts.format, path, self.opts.columns)
        except ReaderError as e:
            raise IngestError(str(e)) from None
        except OSError as e:
            raise IngestError(f"{path}: cannot read: {e.strerror or e}") from None
        self.files.append(str(path))
        try:
            labelled = self._resolve_labels(reader)
            required = reader.required | ({"label"} if labelled else set())
            chunks = reader.chunks(CHUNK_ROWS) if hasattr(reader, "chunks") else \
                (Chunk(None, lambda c=c: c) for c in _chunks(reader.records(), CHUNK_ROWS))
            for chunk in chunks:
                if chunk.table is None or not self._take_table(chunk, labelled, required):
                    self._take(reader, chunk.records(), labelled, required)
                if progress:
                    progress(path, reader.position(), reader.size)
        except ReaderError as e:
            raise IngestError(str(e)) from None
        except (OSError, EOFError, pa.ArrowException) as e:
            raise IngestError(f"{path}: cannot read: {e}") from None
        finally:
            reader.close()

    def _take(self, reader: Reader, chunk: list[Record], labelled: bool, required: set[str]) -> None:
        """Check one chunk of records; keep the good rows, quarantine (or refuse) the bad ones."""
        self.rows_read += len(chunk)
        rows: list[_Row] = []
        where: list[int] = []  # chunk position of each good row
        bad: list[tuple[int, str, str, str]] = []
        for pos, rec in enumerate(chunk):
            try:
                rows.append(self._row(rec, labelled, required))
                where.append(pos)
            except _Bad as e:
                bad.append((pos, *e.args))
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        in_corpus = self.existing.contains(ids)
        earlier = self.seen.contains(ids)
        repeated = np.ones(len(ids), dtype=bool)
        repeated[np.unique(ids, return_index=True)[1]] = False
        keep = ~(in_corpus | earlier | repeated)
        for i in np.flatnonzero(~keep):
            what = f"corpus {self.opts.corpus!r} in the store" if in_corpus[i] else "an earlier row of this ingest"
            bad.append((where[i], "id", "duplicate id", f"id {ids[i]} (source id {rows[i].source_id}) is already in {what}"))
        self.seen.add(ids[keep])
        for pos, fld, reason, detail in sorted(bad):
            rec = chunk[pos]
            if self.opts.strict:
                raise IngestError(
                    f"{reader.path}, {reader.where(rec.line)}, field {fld!r}: {reason}"
                    + (f" ({detail})" if detail else "")
                    + "; --strict: nothing was ingested"
                )
            self.quarantine.add(str(reader.path), rec.line, fld, reason, detail, rec.raw)
        good = [r for r, k in zip(rows, keep) if k]
        if good:
            self.writer.add(_table(good))
            self.rows_written += len(good)
            self.rows_labelled += sum(r.label is not None for r in good)

    def _take_table(self, chunk: Chunk, labelled: bool, required: set[str]) -> bool:
        """The fast path: a chunk read by Arrow, checked column by column. True if every row is good and
        was taken; False (nothing taken) sends the chunk down the per-row path, which names each bad
        row: a missing or empty field, an unknown label, a duplicate id, or a type this path does not
        convert exactly as the per-row one does (a float id, a nested value)."""
        t = chunk.table
        for f in required:
            if f not in t.column_names or t.column(f).null_count:
                return False
        for col in t.columns:  # Arrow's readers do not check UTF-8: a bad byte goes to the per-row path's error
            if pa.types.is_string(col.type):
                try:
                    col.validate(full=True)
                except pa.ArrowInvalid:
                    return False
        for f in required & set(_KEYS):  # a required id or group may not be empty either
            if pa.types.is_string(t.column(f).type) and pc.any(pc.equal(t.column(f), "")).as_py():
                return False
        text = {}
        for f in ("text_a", "text_b"):
            col = t.column(f)
            if not pa.types.is_string(col.type) or pc.any(pc.match_substring_regex(col, BLANK)).as_py():
                return False
            text[f] = col
        keys = {}
        for f in ("group", "id"):
            col = t.column(f) if f in t.column_names else None
            if col is None or pa.types.is_null(col.type):
                keys[f] = pa.nulls(t.num_rows, pa.string())
            elif pa.types.is_string(col.type) or pa.types.is_int64(col.type):
                keys[f] = col.cast(pa.string())
            else:
                return False
        label = pa.nulls(t.num_rows, pa.int32())
        if labelled and "label" in t.column_names and not pa.types.is_null(t.column("label").type):
            col = t.column("label")
            if not (pa.types.is_string(col.type) or pa.types.is_int64(col.type) or pa.types.is_boolean(col.type)):
                return False
            values = pc.unique(col.drop_null())
            index = [self.labels.lookup(v) for v in values.to_pylist()]
            if None in index:
                return False
            at = pc.index_in(col, value_set=values)
            label = pc.take(pa.array(index, pa.int32()), at)
        source = keys["id"].to_pylist()
        if self.opts.ids == "text" or None in source:
            a, b = text["text_a"].to_pylist(), text["text_b"].to_pylist()
            ids = [text_pair_id(x, y) if s is None or self.opts.ids == "text" else source_row_id(s)
                   for x, y, s in zip(a, b, source)]
        elif pa.types.is_int64(t.column("id").type):
            ids = t.column("id").to_numpy()  # a canonical int64 is its own row id
        else:
            ids = [source_row_id(s) for s in source]
        ids = np.asarray(ids, dtype=np.int64)
        if self.existing.contains(ids).any() or self.seen.contains(ids).any() or len(np.unique(ids)) != len(ids):
            return False  # a duplicate id: the per-row path says which rows
        self.seen.add(ids)
        table = pa.table([pa.array(ids, pa.int64()), text["text_a"], text["text_b"], label, keys["group"], keys["id"]],
                         schema=CORPUS_SCHEMA)
        self.rows_read += t.num_rows
        self.writer.add(table)
        self.rows_written += t.num_rows
        self.rows_labelled += t.num_rows - label.null_count
        return True

    def _row(self, rec: Record, labelled: bool, required: set[str]) -> _Row:
        """One record -> a checked row, or _Bad(field, reason, detail)."""
        if rec.error:
            raise _Bad(*rec.error)
        v = rec.values
        for f in FIELDS:
            if f in required and (f not in v or (v[f] is None and f != "label") or (v[f] == "" and f in _KEYS)):
                raise _Bad(f, "missing field", "")
        text_a, text_b = _text(v, "text_a"), _text(v, "text_b")
        label = None
        if labelled and v["label"] is not None:
            label = self.labels.lookup(v["label"])
            if label is None:
                raise _Bad("label", "unknown label", f"{v['label']!r} is not one of {self.label_names}")
        group = _optional_text(v, "group")
        source_id = _optional_text(v, "id")
        if source_id is None or self.opts.ids == "text":
            row_id = text_pair_id(text_a, text_b)
        else:
            row_id = source_row_id(source_id)
        return _Row(row_id, text_a, text_b, label, group, source_id)

    # -- the end
    def commit(self) -> IngestSummary:
        if self.rows_read == 0:  # a wrong or truncated file, most likely: an empty corpus would hide it
            raise IngestError(f"{', '.join(map(str, self.files))}: no rows in the input; nothing was ingested")
        self.writer.finish()
        self.quarantine.close()
        seconds = time.perf_counter() - self.started
        bad = dict(self.quarantine.counts)
        qpath = self.quarantine.path
        source = {
            "files": self.files,
            "format": self.opts.format,
            "columns": self.opts.columns,
            "label_map": self.opts.label_map,
            "unlabeled": self.opts.unlabeled,
            "ids": self.opts.ids,
            "positive_label": self.positive,
            "rows_read": self.rows_read,
            "rows_written": self.rows_written,
            "parts": [p.part for p in self.writer.parts],
            "bad": bad,
            "quarantine": str(qpath.relative_to(self.store.root)) if qpath else None,
            "ingested_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        try:
            self.store.commit_corpus_parts(self.opts.corpus, self.label_names, self.writer.parts, source,
                                           positive_label=self.positive)
        except StoreError as e:
            raise IngestError(str(e)) from None
        return IngestSummary(
            self.opts.corpus, self.files, self.label_names, self.rows_read, self.rows_written, self.rows_labelled,
            [p.part for p in self.writer.parts], bad, qpath, seconds, self.positive or self.declared,
        )

    def discard(self) -> None:
        """Undo everything this ingest wrote (called before the commit, so the manifest is untouched)."""
        self.writer.discard()
        self.quarantine.discard()
        for d, existed in self.dirs_before.items():
            if not existed:
                try:
                    d.rmdir()  # only if empty
                except OSError:
                    pass


def _text(v: dict, f: str) -> str:
    t = v[f]
    if not isinstance(t, str):
        raise _Bad(f, "bad record", f"expected text, got {type(t).__name__}")
    _check_utf8(t, f)
    if not t.strip():
        raise _Bad(f, "empty text", "")
    return t


def _optional_text(v: dict, f: str) -> str | None:
    x = v.get(f)
    if x is None:
        return None
    x = str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)
    _check_utf8(x, f)
    return x


def _check_utf8(t: str, f: str) -> None:
    if t.isascii():
        return
    try:
        t.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Bad(f, "undecodable bytes", f"not UTF-8 at character {e.start}") from None


def _table(rows: list[_Row]) -> pa.Table:
    """Good rows -> an Arrow table in the corpus schema, built column by column."""
    columns = zip(*rows)
    return pa.table([pa.array(list(c), type=f.type) for c, f in zip(columns, CORPUS_SCHEMA)], schema=CORPUS_SCHEMA)


def _chunks(records: Iterable[Record], n: int) -> Iterator[list[Record]]:
    it = iter(records)
    while chunk := list(islice(it, n)):
        yield chunk


class _PartWriter:
    """Buffers good rows and writes a part file every ``part_rows`` rows (committed later, all at once).
    A part is written in a background thread while the next rows are read and checked (Parquet
    encoding and compression release the GIL); at most one write waits behind the one running."""

    def __init__(self, store: Store, corpus: str, first_part: int, part_rows: int):
        self.store, self.corpus, self.next, self.part_rows = store, corpus, first_part, part_rows
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.writing: list[Future] = []
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="tmkd-ingest-writer")
        self.parts: list[CorpusPart] = []

    def add(self, table: pa.Table) -> None:
        self.pending.append(table)
        self.pending_rows += table.num_rows
        while self.pending_rows >= self.part_rows:
            self._write(self.part_rows)

    def finish(self) -> None:
        if self.pending_rows:
            self._write(self.pending_rows)
        self._collect(0)
        self.pool.shutdown()

    def _write(self, n: int) -> None:
        table = pa.concat_tables(self.pending)
        rest = table.slice(n)
        self._collect(1)  # memory: one part being written, one waiting
        self.writing.append(self.pool.submit(self.store.write_corpus_part, self.corpus, self.next,
                                             table.slice(0, n).combine_chunks()))
        self.next += 1
        self.pending, self.pending_rows = ([rest] if rest.num_rows else []), rest.num_rows

    def _collect(self, leave: int) -> None:
        """Wait until at most ``leave`` writes are pending; a failed write raises here."""
        while len(self.writing) > leave:
            self.parts.append(self.writing.pop(0).result())

    def discard(self) -> None:
        for f in self.writing:  # let running writes end, then remove what they wrote
            try:
                self.parts.append(f.result())
            except Exception:
                pass
        self.writing = []
        self.pool.shutdown()
        for p in self.parts:
            p.path.unlink(missing_ok=True)
        self.parts = []


class _Quarantine:
    """Bad rows as JSON lines (file, line, field, reason, detail, raw); the file is made on the first one."""

    def __init__(self, store: Store, corpus: str):
        self.store, self.corpus = store, corpus
        self.path: Path | None = None
        self._f = None
        self.counts: Counter[str] = Counter()

    def add(self, file: str, line: int | str, fld: str, reason: str, detail: str, raw: object) -> None:
        if self._f is None:
            self.path = _fresh(self.store.quarantine_path(self.corpus))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # an object is written whole at close: the lines gather in a local temporary file meanwhile
            self._f = (tempfile.TemporaryFile("w+", encoding="utf-8") if isinstance(self.path, ObjectPath)
                       else open(self.path, "x", encoding="utf-8"))
        entry = {"file": file, "line": line, "field": fld, "reason": reason, "detail": detail, "raw": _printable(raw)}
        self._f.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")
        self.counts[reason] += 1

    def close(self) -> None:
        if self._f:
            if isinstance(self.path, ObjectPath):
                self._f.seek(0)
                self.path.put(self._f.read().encode())
            self._f.close()
            self._f = None

    def discard(self) -> None:
        self.close()
        if self.path:
            self.path.unlink(missing_ok=True)
            self.path = None


def _fresh(path: Path) -> Path:
    """``path``, or ``path`` with -1, -2, ... when it exists (two ingests in one second)."""
    n, candidate = 0, path
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def _printable(raw: object) -> object:
    """The raw record with undecodable bytes shown as \\xNN escapes, so the JSON line is valid UTF-8."""
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(raw, dict):
        return {_printable(k): _printable(x) for k, x in raw.items()}
    if isinstance(raw, (list, tuple)):
        return [_printable(x) for x in raw]
    return raw


@contextmanager
def _store_lock(store: Store):
    """One ingest at a time per store: two would pick the same part numbers. A folder is locked with
    flock (released by the kernel if the ingest dies); an object store with a lock object created only
    if absent, and removed at the end (a killed ingest leaves it: the message says so)."""
    if isinstance(store.root, ObjectPath):
        lock = store.root / "ingest.lock"
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        taken = create_json_if_absent(lock, owner) or (_lock_owner_dead(lock) and create_json_if_absent(lock, owner))
        if not taken:
            raise IngestError(f"{lock}: another ingest into this store is running (or one was killed: then remove "
                              "this object and ingest again)")
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
        return
    fd = os.open(store.root, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise IngestError(f"{store.root}: another ingest into this store is running; try again when it ends") from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _lock_owner_dead(lock) -> bool:
    """Was the lock left by a process of this host that no longer exists? Then it is removed."""
    try:
        info = json.loads(read_record_text(lock))
        if info.get("host") != socket.gethostname():
            return False
        os.kill(int(info["pid"]), 0)
        return False
    except ProcessLookupError:
        lock.unlink(missing_ok=True)
        return True
    except (FileNotFoundError, ValueError, KeyError, TypeError, AttributeError, PermissionError):
        return False


def _check_options(opts: IngestOptions) -> None:
    if opts.format not in FORMATS:
        raise IngestError(f"unknown format {opts.format!r}: use one of {', '.join(FORMATS)}")
    try:
        check_name("corpus", opts.corpus)
    except StoreError as e:
        raise IngestError(str(e)) from None
    unknown = sorted(set(opts.columns) - set(FIELDS))
    if unknown:
        raise IngestError(f"--columns: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(FIELDS)}")
    if opts.part_rows < 1:
        raise IngestError(f"--part-rows must be at least 1, got {opts.part_rows}")
    if opts.ids not in ID_MODES:
        raise IngestError(f"--ids must be one of {', '.join(ID_MODES)}, got {opts.ids!r}")
    if opts.label_names is not None:
        if not opts.label_names or any(not n for n in opts.label_names):
            raise IngestError(f"--label-names: empty label name in {opts.label_names}")
        if len(set(opts.label_names)) != len(opts.label_names):
            raise IngestError(f"--label-names: repeated label name in {opts.label_names}")
    if opts.label_map and opts.unlabeled:
        raise IngestError("--label-map makes no sense with --unlabeled (labels are ignored)")
    if opts.positive_label is not None and not opts.positive_label.strip():
        raise IngestError("--positive-label: empty label name")
