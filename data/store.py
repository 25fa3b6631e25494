"""The label store on disk: its layout, manifests, and atomic commits.

This module is the contract of ``shared/DESIGN.md`` in code. Everything that reads or
writes the store (ingest, the labeler, ``verify``, ``query``, the student trainer) goes
through here, so the layout is defined once::

    STORE/store.json                                   schema version of the store
    STORE/corpus/<corpus>/manifest.json                label space + committed parts (rows, digest)
    STORE/corpus/<corpus>/part-NNNNN.parquet           id, text_a, text_b, label, group, source_id
    STORE/teachers/<teacher>.json                      name, fingerprint, path, label names, ...
    STORE/labels/<teacher>/<corpus>/part-NNNNN.parquet id, row, logits (fixed-size list) + metadata
    STORE/labels/<teacher>/<corpus>/part-NNNNN.commit.json  commit record: the part's digest, rows, fingerprints
    STORE/claims/<teacher>/<corpus>/part-NNNNN.claim   lease of the worker scoring that unit (data/claims.py)
    STORE/quarantine/<corpus>/<stamp>.jsonl            bad rows from ingest, with file/line/reason
    STORE/runs/<stamp>-rank<r>.json                    run logs of ``tmkd-label run``

Commits are atomic: a file is written under a hidden temporary name and renamed into
place. A corpus part counts only once the corpus manifest lists it (with its sha256); a
label part counts only once its commit record exists, names the current teacher fingerprint
and corpus part digest, and the file's sha256 matches the record.

Every read checks what it reads: ``read_corpus_part`` and ``load_label_part`` hash the
bytes they parse against the recorded digest, and Parquet page checksums (written with
every part) are verified while decoding. A part that fails is never consumed: readers get
a ``CorruptPartError`` or a ``LabelCheck`` naming the file and the reason.

Only pyarrow is imported here (no torch), so ``status`` and ``query`` stay fast.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tmkd.data.fs import LocationError, ObjectPath, read_record_text, store_location

SCHEMA_VERSION = 2  # 2: label parts have a `row` column and a commit record with their digest
READABLE_VERSIONS = (1, 2)  # a version-1 store opens; its label parts lack commit records and are re-scored
TOOL_VERSION = "0.1.0"
META_KEY = b"tmkd"  # key of our JSON record in a Parquet file's key-value metadata
PART_RE = re.compile(r"^part-(\d{5})(?:\.[0-9a-f]{16})?\.parquet$")  # on object stores: part-NNNNN.<commit>.parquet
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

CORPUS_SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("text_a", pa.string()),
        ("text_b", pa.string()),
        ("label", pa.int32()),
        ("group", pa.string()),
        ("source_id", pa.string()),
    ]
)


class StoreError(Exception):
    """A user-facing problem with the store (missing, wrong version, inconsistent)."""


class StaleLabelsError(StoreError):
    """Label parts are missing, stale (fingerprint/digest changed) or misaligned with their corpus part."""


class CorruptPartError(StoreError):
    """A committed part does not match its digest, or cannot be read: it is never consumed."""


class CommitRaceError(StoreError):
    """Another worker committed the same unit first (its claim had expired): our result is dropped."""


class LabelSpaceError(StoreError):
    """A teacher's label space differs from a corpus's (or another teacher's)."""


GENERIC_LABEL = re.compile(r"^LABEL_\d+$")  # transformers' default id2label names: carry no meaning
# Names that mean "the positive class" of a binary task, in the order they are tried.
POSITIVE_NAMES = ("1", "true", "yes", "entailment", "relevant", "positive", "paraphrase", "duplicate")


def label_space_mismatch(teacher_name: str, teacher_labels: list[str], what: str,
                         labels: list[str] | None) -> str | None:
    """The one rule for label spaces, used by run, verify, the query views and the trainer.

    ``what`` names the other side ("corpus 'x'" or "teacher 'y'"); ``labels`` None means it
    declares no label space (an unlabeled corpus), which takes any teacher. Returns the
    message if the spaces differ, else None. Counts must match; names must match in order
    unless either side carries only generic LABEL_i names.
    """
    if labels is None:
        return None
    if len(teacher_labels) != len(labels):
        return (f"teacher {teacher_name!r} has {len(teacher_labels)} labels {teacher_labels} but {what} has "
                f"{len(labels)} {labels}; restrict the teacher with `corpora = [...]` in teachers.toml "
                "or use a teacher of this task")
    generic = any(GENERIC_LABEL.match(n) for n in list(teacher_labels) + list(labels))
    if not generic and [n.lower() for n in teacher_labels] != [n.lower() for n in labels]:
        return (f"teacher {teacher_name!r} labels {teacher_labels} do not match {what} labels {labels} "
                "(order matters); set `labels = [...]` in teachers.toml if only the names differ")
    return None


def scored_corpora(teachers, manifests: dict):
    """Each (teacher, corpus name, manifest, label-space mismatch or None) the teacher is set to score:
    the pairs that `run`, `verify` and the query's views all go over, judged by the one rule."""
    for t in teachers:
        for name, m in manifests.items():
            if t.scores(name):
                yield t, name, m, label_space_mismatch(t.name, t.label_names, f"corpus {name!r}", m.label_names)


def positive_index(label_names: list[str], wanted: str | None = None, declared: str | None = None,
                   where: str = "") -> int:
    """Index of the positive class, by name: ``wanted`` (the user's), else the corpus's declared one,
    else the one label whose name means positive (POSITIVE_NAMES). Ambiguity is an error, never a guess."""
    lower = [n.lower() for n in label_names]
    for name, source in ((wanted, "positive_label"), (declared, "the corpus's declared positive label")):
        if name is None:
            continue
        if str(name).lower() not in lower:
            raise StoreError(f"{where}{source} {name!r} is not one of the labels {label_names}")
        return lower.index(str(name).lower())
    found = [i for i, n in enumerate(lower) if n in POSITIVE_NAMES]
    if len(found) == 1:
        return found[0]
    raise StoreError(
        f"{where}cannot tell the positive class of labels {label_names}"
        + (f" (candidates: {[label_names[i] for i in found]})" if found else "")
        + "; name it, e.g. positive_label = " + repr(label_names[-1])
    )


SCORES_KEYS = ("corpus", "part", "row", "id", "label", "group")  # the scores view's columns besides the teachers'


def teacher_name_clash(name: str, others) -> str | None:
    """Why a teacher cannot be named ``name`` beside ``others``, or None. A teacher is a column of the query's
    ``scores`` view, and SQL names ignore case: no key column's name, and no name equal to another's but for case."""
    if name.lower() in SCORES_KEYS:
        return f"teacher name {name!r} is reserved (a column of the scores view: {', '.join(SCORES_KEYS)})"
    twin = next((o for o in others if o != name and o.lower() == name.lower()), None)
    if twin:
        return f"teacher name {name!r} differs from teacher {twin!r} only in case (SQL names ignore case): rename one"
    return None


def check_name(kind: str, name: str) -> str:
    """Corpus and teacher names become folder names: keep them safe and portable."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise StoreError(
            f"invalid {kind} name {name!r}: use letters, digits, '.', '_' or '-' (not starting with '.' or '-')"
        )
    return name


def part_name(part: int) -> str:
    return f"part-{part:05d}.parquet"


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_path(path: Path, token: str | None = None) -> Path:
    """A hidden temporary beside ``path``; ``token`` ties it to a claim (see data/claims.py)."""
    return path.parent / f".{path.name}.{token or uuid.uuid4().hex}.tmp"


def tmp_token(tmp: Path) -> str | None:
    """The token in a temporary's name (``.<name>.<token>.tmp``), or None if it is not one."""
    parts = tmp.name.split(".")
    return parts[-2] if tmp.name.startswith(".") and len(parts) >= 4 and parts[-1] == "tmp" else None


@contextlib.contextmanager
def temporary_for(path: Path, token: str | None = None):
    """A hidden temporary beside ``path`` for the block to write, removed if the block fails (a full disk or a
    kill must leave none behind); an OSError that names no file (Arrow's write errors, a full disk among them) or
    only the temporary is raised naming ``path``."""
    tmp = _tmp_path(path, token)
    try:
        yield tmp
    except BaseException as e:
        with contextlib.suppress(OSError):  # on a read-only mount the removal fails too (EROFS)
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename in (None, str(tmp)):  # the file the user knows, not the temporary
            raise OSError(e.errno, (e.strerror or str(e)).replace(str(tmp), str(path)), str(path)) from e
        raise


def atomic_write_bytes(path: Path | ObjectPath, data: bytes) -> None:
    if isinstance(path, ObjectPath):
        path.put(data)  # one PUT is atomic: readers see the old object or the new one
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_for(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    _fsync_dir(path.parent)


def create_json_if_absent(path: Path | ObjectPath, obj, token: str | None = None) -> bool:
    """Write ``path`` only if it does not exist, atomically and complete (hard link of a finished
    temporary: fails if the name is taken, on local disks and NFS; a conditional PUT on an object
    store). True if we created it. ``token`` ties the temporary to a claim (see data/claims.py)."""
    if isinstance(path, ObjectPath):
        return path.create((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_for(path, token) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            with contextlib.suppress(OSError):  # never in place of the link's own error (temporary_for names it)
                tmp.unlink(missing_ok=True)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_parquet(path: Path, table: pa.Table, token: str | None = None, before_replace=None,
                         **write_options) -> tuple[str, int]:
    """Write ``table`` to ``path`` atomically, with page checksums; return the file's sha256 digest and size.

    ``before_replace`` (if given) runs after the file is complete and before it takes its final
    name; it may raise to abandon the write (a lost claim), and then nothing is replaced. On an
    object store the file is built in memory and written in one PUT."""
    if isinstance(path, ObjectPath):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, write_page_checksum=True, **write_options)
        data = sink.getvalue().to_pybytes()
        if before_replace is not None:
            before_replace()
        path.put(data)
        return "sha256:" + hashlib.sha256(data).hexdigest(), len(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_for(path, token) as tmp:
        pq.write_table(table, tmp, write_page_checksum=True, **write_options)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest, size = file_digest(tmp), tmp.stat().st_size
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    _fsync_dir(path.parent)
    return digest, size


def remove_stale_tmp(path: Path, keep: str | None = None) -> int:
    """Delete temporaries a dead writer left for ``path``; call it only while holding ``path``
    (the ingest lock, or the unit's claim, whose token ``keep`` names our own). Returns the count.
    Object stores have no temporaries (a part is one PUT): nothing to list there."""
    if isinstance(path, ObjectPath):
        return 0
    n = 0
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        if keep is None or tmp_token(tmp) != keep:
            tmp.unlink(missing_ok=True)
            n += 1
    return n


def read_verified(path: Path, digest: str, what: str) -> bytes:
    """The bytes of a committed file, checked against its recorded digest (CorruptPartError if not)."""
    if not isinstance(path, ObjectPath) and path.exists() and not path.is_file():  # a folder, a FIFO, a device
        raise CorruptPartError(f"{path}: {what} is not a regular file")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptPartError(f"{path}: {what} is missing") from None
    except OSError as e:
        raise CorruptPartError(f"{path}: {what} cannot be read ({e.strerror})") from None
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise CorruptPartError(f"{path}: {what} does not match its recorded digest (the file changed after it "
                               f"was committed: {len(data):,} bytes, {actual[:19]}…, recorded {digest[:19]}…)")
    return data


def parse_parquet(data: bytes, path: Path, what: str, columns: list[str] | None = None) -> pa.Table:
    """Decode Parquet bytes, verifying page checksums; a damaged file is a CorruptPartError."""
    try:
        pf = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise CorruptPartError(f"{path}: {what} cannot be decoded ({e})") from None
    missing = [c for c in columns or () if c not in pf.schema_arrow.names]
    if missing:  # a file without a column its schema requires is damaged, not a bug to trace back
        raise CorruptPartError(f"{path}: {what} has no column {missing[0]!r}")
    try:
        return pf.read(columns, use_threads=False)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise CorruptPartError(f"{path}: {what} cannot be decoded ({e})") from None


@dataclass
class CorpusPart:
    corpus: str
    part: int
    rows: int
    digest: str
    path: Path
    num_labels: int | None = None  # the manifest's label count: reads refuse labels outside it (not stored)

    def to_json(self) -> dict:
        return {"part": self.part, "file": self.path.name, "rows": self.rows, "digest": self.digest}


@dataclass
class CorpusManifest:
    name: str
    label_names: list[str] | None  # None: the corpus declares no label space (unlabeled)
    parts: list[CorpusPart] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)  # one entry per ingest: file, format, counts
    positive_label: str | None = None  # the declared positive class (a label name), if any

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.parts)

    @property
    def num_labels(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)


@dataclass
class TeacherRecord:
    """What the store remembers of a teacher; its fingerprint decides whether labels are current."""

    name: str
    fingerprint: str
    path: str
    label_names: list[str]
    dtype: str
    max_length: int
    truncation: str = "longest_first"
    corpora: list[str] | None = None  # None: every corpus in the store
    tokenizer_fingerprint: str = ""

    def scores(self, corpus: str) -> bool:
        return self.corpora is None or corpus in self.corpora


@dataclass
class LabelCheck:
    """Result of checking one (teacher, corpus part) label file against the store.

    ``ok``: committed, current and intact. ``missing``: never committed. ``stale``: committed for
    another fingerprint, corpus part digest or schema version (a changed teacher or old store).
    ``bad``: damaged or inconsistent (digest, checksums, schema, rows, ids, non-finite logits).
    """

    status: str  # "ok", "missing", "stale", "bad"
    reason: str = ""
    table: pa.Table | None = field(default=None, repr=False)  # the decoded part, when it was read
    record: dict | None = field(default=None, repr=False)  # its commit record, when current
    path: Path | None = None  # the data file its commit record names, when current

    @property
    def invalid(self) -> bool:
        """Committed but not usable: stale or bad. Readers leave such parts out and say so."""
        return self.status in ("stale", "bad")


class Store:
    """A label store rooted at a folder. ``Store(path)`` opens one; ``Store.create`` makes one."""

    def __init__(self, root: str | os.PathLike | ObjectPath):
        try:
            self.root = store_location(root)  # a folder, or a prefix in an object store (data/fs.py)
        except LocationError as e:
            raise StoreError(str(e)) from None
        meta = self.root / "store.json"
        if not meta.exists():
            raise StoreError(f"{self.root}: not a tmkd label store (no store.json); create one with `tmkd-label ingest`")
        try:
            info = json.loads(read_record_text(meta))
            if not isinstance(info, dict):
                raise ValueError("not a JSON object")
        except (ValueError, OSError) as e:
            raise StoreError(f"{meta}: unreadable store record ({e})") from None
        self.version = info.get("schema_version")
        if self.version not in READABLE_VERSIONS:
            raise StoreError(
                f"{self.root}: store schema version {info.get('schema_version')} but this tmkd reads version "
                f"{SCHEMA_VERSION}; re-create the store or use a matching tmkd version"
            )

    @classmethod
    def create(cls, root: str | os.PathLike | ObjectPath) -> "Store":
        try:
            root = store_location(root)
        except LocationError as e:
            raise StoreError(str(e)) from None
        if not (root / "store.json").exists():
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(root / "store.json", {"schema_version": SCHEMA_VERSION, "tool_version": TOOL_VERSION})
        return cls(root)

    def upgrade(self) -> None:
        """Mark a version-1 store as version 2 (its label parts are re-scored; corpora are unchanged).
        Only writing commands call this."""
        if self.version != SCHEMA_VERSION:
            atomic_write_json(self.root / "store.json", {"schema_version": SCHEMA_VERSION, "tool_version": TOOL_VERSION})
            self.version = SCHEMA_VERSION

    # ---- corpora -------------------------------------------------------------------------
    def corpus_dir(self, corpus: str) -> Path:
        return self.root / "corpus" / corpus

    def corpora(self) -> list[str]:
        base = self.root / "corpus"
        return sorted(p.parent.name for p in base.glob("*/manifest.json")) if base.exists() else []

    def has_corpus(self, corpus: str) -> bool:
        return (self.corpus_dir(corpus) / "manifest.json").exists()

    def corpus(self, corpus: str) -> CorpusManifest:
        path = self.corpus_dir(corpus) / "manifest.json"
        if not path.exists():
            known = ", ".join(self.corpora()) or "none"
            raise StoreError(f"{self.root}: no corpus {corpus!r} (corpora in the store: {known})")
        try:
            raw = json.loads(read_record_text(path))
            names = raw["label_names"]
            if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise TypeError(f"label_names {names!r}")
            parts = [
                CorpusPart(corpus, _typed(p["part"], int), _typed(p["rows"], int), _typed(p["digest"], str),
                           self.corpus_dir(corpus) / Path(_typed(p["file"], str)).name,
                           len(names) if names is not None else None)
                for p in raw["parts"]
            ]
            return CorpusManifest(_typed(raw["name"], str), names, parts, raw.get("sources", []),
                                  raw.get("positive_label"))
        except (ValueError, OSError, KeyError, TypeError, AttributeError) as e:
            raise StoreError(f"{path}: unreadable corpus manifest ({type(e).__name__}: {e}); restore it "
                             "or re-ingest the corpus") from None

    def write_corpus_manifest(self, m: CorpusManifest) -> None:
        atomic_write_json(
            self.corpus_dir(m.name) / "manifest.json",
            {
                "name": m.name,
                "label_names": m.label_names,
                "parts": [p.to_json() for p in m.parts],
                "sources": m.sources,
                "positive_label": m.positive_label,
                "schema_version": SCHEMA_VERSION,
            },
        )

    def write_corpus_part(self, corpus: str, part: int, table: pa.Table) -> CorpusPart:
        """Write one corpus part file atomically. It counts only once ``commit_corpus_parts`` lists it."""
        table = table.select(CORPUS_SCHEMA.names).cast(CORPUS_SCHEMA)
        path = self.corpus_dir(corpus) / part_name(part)
        remove_stale_tmp(path)
        digest, _ = atomic_write_parquet(path, table, compression="zstd", write_statistics=["id", "label"])
        return CorpusPart(corpus, part, table.num_rows, digest, path)

    def next_part_number(self, corpus: str) -> int:
        return max((p.part for p in self.corpus(corpus).parts), default=-1) + 1 if self.has_corpus(corpus) else 0

    def commit_corpus_parts(
        self, corpus: str, label_names: list[str] | None, parts: list[CorpusPart], source: dict,
        positive_label: str | None = None,
    ) -> CorpusManifest:
        """Append written parts to the corpus manifest in one atomic rename (parts are immutable)."""
        check_name("corpus", corpus)
        if self.has_corpus(corpus):
            m = self.corpus(corpus)
            if m.label_names != label_names:
                raise StoreError(
                    f"corpus {corpus!r} has label names {m.label_names}, the new data {label_names}; "
                    "use the same label names or another corpus name"
                )
            taken = {p.part for p in m.parts}
            clash = sorted(taken & {p.part for p in parts})
            if clash:
                raise StoreError(f"corpus {corpus!r}: parts {clash} already committed (another ingest ran at once?)")
            if positive_label is not None and m.positive_label not in (None, positive_label):
                raise StoreError(f"corpus {corpus!r} declares positive label {m.positive_label!r}, the new data "
                                 f"{positive_label!r}")
        else:
            m = CorpusManifest(corpus, label_names)
        if positive_label is not None:
            if label_names is None or positive_label not in label_names:
                raise StoreError(f"corpus {corpus!r}: positive label {positive_label!r} is not one of {label_names}")
            m.positive_label = positive_label
        m.parts = sorted(m.parts + parts, key=lambda p: p.part)
        m.sources.append(source)
        self.write_corpus_manifest(m)
        return m

    def read_corpus_part(self, part: CorpusPart, columns: list[str] | None = None) -> pa.Table:
        """A committed corpus part, checked: digest against the manifest, page checksums, row count, and the
        columns read against the corpus schema (types, no null id or text, labels within the manifest's label
        names). Raises CorruptPartError naming the file; a damaged part is never consumed."""
        what = f"corpus part {part.corpus}/{part.part}"
        data = read_verified(part.path, part.digest, what)
        table = parse_parquet(data, part.path, what, columns or CORPUS_SCHEMA.names)
        if table.num_rows != part.rows:
            raise CorruptPartError(f"{part.path}: {table.num_rows} rows, the manifest says {part.rows}")
        problem = corpus_table_problem(table, part.num_labels)
        if problem:
            raise CorruptPartError(f"{part.path}: {what}: {problem}")
        return table

    # ---- teachers ------------------------------------------------------------------------
    def teacher_path(self, name: str) -> Path:
        return self.root / "teachers" / f"{name}.json"

    def teachers(self) -> dict[str, TeacherRecord]:
        base = self.root / "teachers"
        out = {}
        for p in sorted(base.glob("*.json")) if base.exists() else []:
            rec = self._read_teacher(p)
            out[rec.name] = rec
        return out

    @staticmethod
    def _read_teacher(path: Path) -> TeacherRecord:
        try:
            rec = TeacherRecord(**json.loads(read_record_text(path)))
            for name in ("name", "fingerprint", "path", "dtype"):
                _typed(getattr(rec, name), str)
            _typed(rec.max_length, int)
            if not isinstance(rec.label_names, list) or not all(isinstance(n, str) for n in rec.label_names):
                raise TypeError(f"label_names {rec.label_names!r}")
            if rec.corpora is not None and not isinstance(rec.corpora, list):
                raise TypeError(f"corpora {rec.corpora!r}")
            return rec
        except (ValueError, TypeError, OSError) as e:
            raise StoreError(f"{path}: unreadable teacher record ({e}); remove it and run `tmkd-label run` "
                             "to record the teacher again") from None

    def record_teacher(self, rec: TeacherRecord, replace: bool = False) -> None:
        """Record a teacher. A new name is created only if absent, so of two runs started at once with
        different checkpoints under one name, the second is refused instead of overwriting the first."""
        if create_json_if_absent(self.teacher_path(rec.name), asdict(rec)):
            return
        old = self.teacher(rec.name)
        if old == rec:
            return
        if old.fingerprint != rec.fingerprint and not replace:
            raise StoreError(
                f"teacher {rec.name!r} changed: the store has fingerprint {old.fingerprint[:19]}… "
                f"(from {old.path}), the checkpoint now gives {rec.fingerprint[:19]}…. Give it a new name, "
                "or pass --replace to re-score it (its old labels then count as stale)")
        self.write_teacher(rec)

    def teacher(self, name: str) -> TeacherRecord:
        path = self.teacher_path(name)
        if not path.exists():
            known = ", ".join(self.teachers()) or "none"
            raise StoreError(f"{self.root}: no teacher {name!r} (teachers in the store: {known})")
        return self._read_teacher(path)

    def write_teacher(self, rec: TeacherRecord) -> None:
        problem = teacher_name_clash(rec.name, self.teachers())
        if problem:
            raise StoreError(problem)
        atomic_write_json(self.teacher_path(rec.name), asdict(rec))

    # ---- labels --------------------------------------------------------------------------
    def label_path(self, teacher: str, corpus: str, part: int) -> Path:
        return self.root / "labels" / teacher / corpus / part_name(part)

    @staticmethod
    def commit_path(label_path: Path) -> Path:
        return label_path.with_name(label_path.name.replace(".parquet", ".commit.json"))

    def label_data_path(self, teacher: str, corpus: str, part: int, record: dict) -> Path | None:
        """The data file a commit record names: ``part-NNNNN.parquet`` on a disk, ``part-NNNNN.<commit>.parquet``
        (a key of its own per commit) on an object store; None if it names no file of this unit."""
        path = self.label_path(teacher, corpus, part)
        name = record.get("file", path.name)
        match = PART_RE.match(name) if isinstance(name, str) else None
        return path.with_name(name) if match and int(match.group(1)) == part else None

    def label_files(self) -> list[Path]:
        """Every label data file with a part name (temporaries are hidden files and never match)."""
        base = self.root / "labels"
        return sorted(base.glob("*/*/part-*.parquet")) if base.exists() else []

    def label_commit(self, teacher: str, corpus: str, part: int) -> dict | None:
        """The commit record of a label part, None if it has none; StoreError if it is unreadable."""
        path = self.commit_path(self.label_path(teacher, corpus, part))
        try:
            record = json.loads(read_record_text(path))
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as e:
            raise CorruptPartError(f"{path}: unreadable commit record ({e})") from None
        if not isinstance(record, dict) or not isinstance(record.get("digest"), str):
            raise CorruptPartError(f"{path}: unreadable commit record (not a tmkd commit record)")
        return record

    def check_commit(self, teacher: TeacherRecord, part: CorpusPart) -> LabelCheck:
        """The first half of the one rule, from the commit record alone: a record naming the current
        fingerprint, corpus part digest and schema, and its data file present at the recorded size.
        No byte of the part is read (`status`); ``check_label`` goes on to the bytes."""
        path = self.label_path(teacher.name, part.corpus, part.part)
        try:
            record = self.label_commit(teacher.name, part.corpus, part.part)
        except CorruptPartError as e:
            return LabelCheck("bad", str(e))  # names the commit record's path
        if record is None:
            if path.exists():
                return LabelCheck("stale", "no commit record (written by an older tmkd, or its writer was killed "
                                           "before committing)")
            return LabelCheck("missing")
        if record.get("schema_version") != SCHEMA_VERSION:
            return LabelCheck("stale", f"schema version {record.get('schema_version')} != {SCHEMA_VERSION}")
        if record.get("fingerprint") != teacher.fingerprint:
            return LabelCheck("stale", "teacher fingerprint changed")
        if record.get("corpus_part_digest") != part.digest:
            return LabelCheck("stale", "corpus part digest changed")
        data = self.label_data_path(teacher.name, part.corpus, part.part, record)
        if data is None:
            return LabelCheck("bad", f"the commit record names {record.get('file')!r}, not a data file of this part")
        return LabelCheck("ok", record=record, path=data)

    def label_size_problem(self, check: LabelCheck) -> str | None:
        """Is the committed data file there, at the size its record gives (records before sizes: present)?"""
        path, record = check.path, check.record
        if isinstance(path, ObjectPath):
            head = path.head()
            size = None if head is None else head["size"]
        else:
            size = path.stat().st_size if path.is_file() else None
        if size is None:
            return "its data file is missing"
        if isinstance(record.get("bytes"), int) and size != record["bytes"]:
            return f"{size:,} bytes, the commit record says {record['bytes']:,}"
        return None

    def check_label(self, teacher: TeacherRecord, part: CorpusPart, corpus_ids: np.ndarray | None = None,
                    decode: bool = True) -> LabelCheck:
        """Is this unit committed, current and intact? The one rule every reader and writer applies.

        Always: a commit record naming the current fingerprint, corpus part digest and schema
        (``check_commit``), and the file's sha256 equal to the record's. With ``decode`` (the
        default): page checksums, schema, one logit per label, the corpus part's row count, finite
        logits, and, given ``corpus_ids``, the same ids in the same order. The decoded table is
        returned in ``table``.
        """
        check = self.check_commit(teacher, part)
        if check.status != "ok":
            return check
        record, path = check.record, check.path
        try:
            data = read_verified(path, record.get("digest", ""), "label part")
        except CorruptPartError as e:
            return LabelCheck("bad", str(e).split(": ", 1)[1], path=path)
        if not decode:
            return LabelCheck("ok", record=record, path=path)
        try:
            table = parse_parquet(data, path, "label part")
        except CorruptPartError as e:
            return LabelCheck("bad", str(e).split(": ", 1)[1], path=path)
        problem = _label_table_problem(table, len(teacher.label_names), part.rows, corpus_ids)
        if problem:
            return LabelCheck("bad", problem, path=path)
        return LabelCheck("ok", table=table, record=record, path=path)

    def write_label_part(
        self,
        teacher: TeacherRecord,
        part: CorpusPart,
        ids: np.ndarray,
        logits: np.ndarray,
        store_dtype: str = "float32",
        compute_dtype: str = "float32",
        token: str | None = None,
        still_mine=None,
    ) -> Path:
        """Commit one (teacher, corpus part) label file: data file, then its commit record.

        ``token`` names the writer's claim (its temporaries carry it); ``still_mine`` is called just
        before the commit and may raise to abandon it (the claim was lost to another worker).
        Logits that are not all finite are refused: a broken teacher must not enter the store.
        """
        n, k = logits.shape
        if n != part.rows or len(ids) != part.rows:
            raise StoreError(f"{teacher.name} × {part.corpus}/{part.part}: {n} logits for {part.rows} rows")
        finite = np.isfinite(logits).all(axis=1)
        if not finite.all():
            raise StoreError(f"teacher {teacher.name!r} gave NaN/inf logits for {int((~finite).sum())} rows of "
                             f"corpus {part.corpus!r} part {part.part} (first at row {int(np.argmin(finite))}); "
                             "nothing was written for this part")
        path = self.label_path(teacher.name, part.corpus, part.part)
        commit = self.commit_path(path)
        for p in (path, commit) if not isinstance(path, ObjectPath) else ():
            if p.exists() and not p.is_file():
                raise StoreError(f"{p}: not a regular file (a folder?) where teacher {teacher.name!r} writes "
                                 f"corpus {part.corpus!r} part {part.part}; remove it and run again")
        values = pa.array(logits.astype(np.float16 if store_dtype == "float16" else np.float32).reshape(-1))
        table = pa.table({
            "id": pa.array(ids, pa.int64()),
            "row": pa.array(np.arange(n, dtype=np.int32)),
            "logits": pa.FixedSizeListArray.from_arrays(values, k),
        })
        meta = {
            "teacher": teacher.name,
            "fingerprint": teacher.fingerprint,
            "corpus": part.corpus,
            "part": part.part,
            "corpus_part_digest": part.digest,
            "label_names": teacher.label_names,
            "schema_version": SCHEMA_VERSION,
            "tool_version": TOOL_VERSION,
            "dtype": compute_dtype,
            "logits_dtype": store_dtype,
            "max_length": teacher.max_length,
            "truncation": teacher.truncation,
        }
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()})

        # float32 logits compress well with BYTE_STREAM_SPLIT; DuckDB cannot read it on float16.
        bss = ["logits.list.element"] if store_dtype == "float32" else False
        options = dict(compression="zstd", use_dictionary=["id"], use_byte_stream_split=bss, write_statistics=["id"],
                       column_encoding={"row": "DELTA_BINARY_PACKED"})
        # commit_id tells this commit from an earlier one of the same bytes (a re-scored damaged part)
        commit_id = uuid.uuid4().hex
        if isinstance(path, ObjectPath):
            return self._commit_object(teacher, part, table, meta, n, commit_id, still_mine, options)

        def commit_old_out():
            if still_mine is not None:
                still_mine()
            commit.unlink(missing_ok=True)  # the old part stops counting before its file is replaced

        digest, size = atomic_write_parquet(path, table, token=token, before_replace=commit_old_out, **options)
        if still_mine is not None:
            still_mine()
        # The record is created only if absent: of two commits of one unit, the second is refused.
        if not create_json_if_absent(commit, {**meta, "digest": digest, "bytes": size, "rows": n, "file": path.name,
                                              "commit_id": commit_id}):
            raise CommitRaceError(f"{commit}: another worker committed {teacher.name} × {part.corpus}/{part.part} "
                                  "while this one was writing it; this result is dropped")
        return path

    def _commit_object(self, teacher, part, table, meta, n, commit_id, still_mine, options) -> ObjectPath:
        """On an object store: the data under a key of its own (``part-NNNNN.<commit>.parquet``), then the
        commit record that makes it visible, by a conditional PUT: created if absent, or written over the
        very record this writer read (a stale or damaged part it re-scores). Of two writers of one unit the
        second's record is refused and its data removed: a committed part's bytes are never written over.
        Data objects of the unit that no record names any more are removed after the commit."""
        path = self.label_path(teacher.name, part.corpus, part.part)
        commit = self.commit_path(path)
        try:
            seen = commit.read_tagged()[1]
        except FileNotFoundError:
            seen = None
        data = path.with_name(f"part-{part.part:05d}.{commit_id[:16]}.parquet")
        if still_mine is not None:
            still_mine()
        digest, size = atomic_write_parquet(data, table, **options)
        record = {**meta, "digest": digest, "bytes": size, "rows": n, "file": data.name, "commit_id": commit_id}
        body = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
        try:
            if still_mine is not None:
                still_mine()
            committed = commit.create(body) if seen is None else commit.put_if(body, seen)
        except BaseException:
            data.unlink(missing_ok=True)
            raise
        if not committed:
            data.unlink(missing_ok=True)
            raise CommitRaceError(f"{commit}: another worker committed {teacher.name} × {part.corpus}/{part.part} "
                                  "while this one was writing it; this result is dropped")
        for old in path.parent.glob(f"part-{part.part:05d}*.parquet"):  # what earlier commits named
            if old != data:
                old.unlink(missing_ok=True)
        return data

    def read_aligned(self, part: CorpusPart, teachers: list[TeacherRecord], columns: list[str] | None = None):
        """Read a corpus part with its teachers' logits, zipped by position, every byte checked.

        Returns (corpus table, logits array of shape [rows, teachers, labels], float32).
        Raises CorruptPartError for a damaged corpus part, StaleLabelsError naming the file if a
        label part is missing, stale, damaged or misaligned.
        """
        cols = None if columns is None else list(dict.fromkeys(["id", *columns]))
        table = self.read_corpus_part(part, cols)
        ids = table.column("id").to_numpy()
        stacked = []
        for t in teachers:
            check = self.check_label(t, part, corpus_ids=ids)
            if check.status != "ok":
                raise StaleLabelsError(
                    f"{check.path or self.label_path(t.name, part.corpus, part.part)}: label part {check.status} for "
                    "teacher "
                    f"{t.name!r}, corpus {part.corpus!r} part {part.part}"
                    + (f" ({check.reason})" if check.reason else "")
                    + "; run `tmkd-label run` to score it again"
                )
            stacked.append(logits_to_numpy(check.table.column("logits")))
        logits = np.stack(stacked, axis=1) if stacked else np.zeros((len(ids), 0, 0), np.float32)
        return table, logits

    # ---- quarantine and run logs ---------------------------------------------------------
    def quarantine_path(self, corpus: str) -> Path:
        return self.root / "quarantine" / corpus / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.jsonl"

    def run_log_path(self, rank: int) -> Path:
        host = re.sub(r"[^A-Za-z0-9._-]", "_", os.uname().nodename)
        return self.root / "runs" / f"{time.strftime('%Y%m%dT%H%M%S')}-{host}-{os.getpid()}-rank{rank}.json"

    def write_run_log(self, record: dict, path: Path) -> Path:
        atomic_write_json(path, record)
        return path

    def run_logs(self) -> list[dict]:
        base = self.root / "runs"
        return [json.loads(read_record_text(p)) for p in sorted(base.glob("*.json"))] if base.exists() else []


def _nulls(table: pa.Table, names: list[str]) -> str | None:
    """The first of ``names`` that holds a null, with the count and the first row, or None."""
    for name in names:
        if table.column(name).null_count:
            row = int(np.argmax(table.column(name).is_null().to_numpy(zero_copy_only=False)))
            return f"{table.column(name).null_count} null {name!r} values (first at row {row})"
    return None


def corpus_table_problem(table: pa.Table, num_labels: int | None = None) -> str | None:
    """What is wrong with the columns of a decoded corpus part, or None (vectorised: no loop over rows)."""
    for name in table.schema.names:  # the columns read, every one of them in the schema
        got, want = table.schema.field(name).type, CORPUS_SCHEMA.field(name).type
        if got != want:
            return f"column {name!r} has type {got}, expected {want}"
    nulls = _nulls(table, [n for n in ("id", "text_a", "text_b") if n in table.schema.names])
    if nulls:
        return nulls
    if "label" in table.schema.names and table.num_rows > table.column("label").null_count:
        label = table.column("label").to_numpy(zero_copy_only=False)  # float with NaN for nulls
        top = num_labels if num_labels is not None else np.inf
        bad = (label < 0) | (label >= top)
        if bad.any():
            row = int(np.argmax(bad))
            return (f"{int(bad.sum())} labels outside 0..{'' if num_labels is None else num_labels - 1} "
                    f"(first at row {row}: {label[row]:g})")
    return None


def _label_table_problem(table: pa.Table, num_labels: int, rows: int, corpus_ids: np.ndarray | None) -> str | None:
    """What is wrong with a decoded label part, or None: schema, row count, ids, finite logits."""
    names = table.schema.names
    if "id" not in names or "logits" not in names or not pa.types.is_int64(table.schema.field("id").type):
        return f"not a label part: columns {names}"
    ltype = table.schema.field("logits").type
    if not pa.types.is_fixed_size_list(ltype) or not pa.types.is_floating(ltype.value_type):
        return f"logits column has type {ltype}, expected a fixed-size list of floats"
    if ltype.list_size != num_labels:
        return f"{ltype.list_size} logits per row, the teacher has {num_labels} labels"
    if table.num_rows != rows:
        return f"{table.num_rows} rows, the corpus part has {rows}"
    nulls = _nulls(table, ["id", "logits"])  # a null row would vanish from logits_to_numpy, shifting the rest
    if nulls:
        return nulls
    ids = table.column("id").to_numpy()
    if corpus_ids is not None and not np.array_equal(ids, corpus_ids):
        row = int(np.argmax(ids != corpus_ids))
        return f"ids not aligned with the corpus part (first mismatch at row {row})"
    logits = logits_to_numpy(table.column("logits"))
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        return f"{int(bad.sum())} rows with NaN/inf logits (first at row {int(np.argmax(bad))})"
    return None


def _typed(value, kind: type):
    """``value`` if it has type ``kind`` (bool is not an int), else TypeError: records are checked, not trusted."""
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"expected {kind.__name__}, got {value!r}")
    return value


def logits_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column of floats -> float32 array [rows, labels], without a Python loop."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:  # flatten() would drop the null rows and misalign the rest; checked parts have none
        raise ValueError(f"logits column with {arr.null_count} null rows")
    width = arr.type.list_size
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, width).astype(np.float32, copy=False)
