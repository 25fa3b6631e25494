"""The label store on disk: its layout, manifests, and atomic commits.

This module is the contract of ``shared/DESIGN.md`` in code. Everything that reads or
writes the store (ingest, the labeler, ``verify``, ``query``, the student trainer) goes
through here, so the layout is defined once::

    STORE/store.json                                   schema version of the store
    STORE/corpus/<corpus>/manifest.json                label space + committed parts (rows, digest)
    STORE/corpus/<corpus>/part-NNNNN.parquet           id, text_a, text_b, label, group, source_id
    STORE/teachers/<teacher>.json                      name, fingerprint, path, label names, ...
    STORE/labels/<teacher>/<corpus>/part-NNNNN.parquet id, logits (fixed-size list) + metadata
    STORE/quarantine/<corpus>/<stamp>.jsonl            bad rows from ingest, with file/line/reason
    STORE/runs/<stamp>-rank<r>.json                    run logs of ``tmkd-label run``

Commits are atomic: a file is written under a hidden temporary name and renamed into
place. A corpus part counts only once the corpus manifest lists it; a label part counts
once its final name exists *and* its metadata carries the current teacher fingerprint and
the digest of the corpus part it was computed from.

Only pyarrow is imported here (no torch), so ``status`` and ``query`` stay fast.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
TOOL_VERSION = "0.1.0"
META_KEY = b"tmkd"  # key of our JSON record in a Parquet file's key-value metadata
PART_RE = re.compile(r"^part-(\d{5})\.parquet$")
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


def check_name(kind: str, name: str) -> str:
    """Corpus and teacher names become folder names: keep them safe and portable."""
    if not NAME_RE.match(name or ""):
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


def _tmp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.{os.getpid()}.tmp"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_write_parquet(path: Path, table: pa.Table, **write_options) -> str:
    """Write ``table`` to ``path`` atomically; return the sha256 digest of the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        pq.write_table(table, tmp, **write_options)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        digest = file_digest(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return digest


def remove_stale_tmp(path: Path) -> None:
    """Delete temporaries a killed writer left for ``path`` (only its owner writes it)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)


@dataclass
class CorpusPart:
    corpus: str
    part: int
    rows: int
    digest: str
    path: Path

    def to_json(self) -> dict:
        return {"part": self.part, "file": self.path.name, "rows": self.rows, "digest": self.digest}


@dataclass
class CorpusManifest:
    name: str
    label_names: list[str] | None  # None: the corpus declares no label space (unlabeled)
    parts: list[CorpusPart] = field(default_factory=list)
    sources: list[dict] = field(default_factory=list)  # one entry per ingest: file, format, counts

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
    """Result of checking one (teacher, corpus part) label file against the store."""

    status: str  # "ok", "missing", "stale", "bad"
    reason: str = ""


class Store:
    """A label store rooted at a folder. ``Store(path)`` opens one; ``Store.create`` makes one."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        meta = self.root / "store.json"
        if not meta.exists():
            raise StoreError(f"{self.root}: not a tmkd label store (no store.json); create one with `tmkd-label ingest`")
        info = json.loads(meta.read_text())
        if info.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{self.root}: store schema version {info.get('schema_version')} but this tmkd reads version "
                f"{SCHEMA_VERSION}; re-create the store or use a matching tmkd version"
            )

    @classmethod
    def create(cls, root: str | os.PathLike) -> "Store":
        root = Path(root)
        if not (root / "store.json").exists():
            root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(root / "store.json", {"schema_version": SCHEMA_VERSION, "tool_version": TOOL_VERSION})
        return cls(root)

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
        raw = json.loads(path.read_text())
        parts = [
            CorpusPart(corpus, p["part"], p["rows"], p["digest"], self.corpus_dir(corpus) / p["file"])
            for p in raw["parts"]
        ]
        return CorpusManifest(raw["name"], raw["label_names"], parts, raw.get("sources", []))

    def write_corpus_manifest(self, m: CorpusManifest) -> None:
        atomic_write_json(
            self.corpus_dir(m.name) / "manifest.json",
            {
                "name": m.name,
                "label_names": m.label_names,
                "parts": [p.to_json() for p in m.parts],
                "sources": m.sources,
                "schema_version": SCHEMA_VERSION,
            },
        )

    def write_corpus_part(self, corpus: str, part: int, table: pa.Table) -> CorpusPart:
        """Write one corpus part file atomically. It counts only once ``commit_corpus_parts`` lists it."""
        table = table.select(CORPUS_SCHEMA.names).cast(CORPUS_SCHEMA)
        path = self.corpus_dir(corpus) / part_name(part)
        remove_stale_tmp(path)
        digest = atomic_write_parquet(path, table, compression="zstd", write_statistics=["id", "label"])
        return CorpusPart(corpus, part, table.num_rows, digest, path)

    def next_part_number(self, corpus: str) -> int:
        return max((p.part for p in self.corpus(corpus).parts), default=-1) + 1 if self.has_corpus(corpus) else 0

    def commit_corpus_parts(
        self, corpus: str, label_names: list[str] | None, parts: list[CorpusPart], source: dict
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
        else:
            m = CorpusManifest(corpus, label_names)
        m.parts = sorted(m.parts + parts, key=lambda p: p.part)
        m.sources.append(source)
        self.write_corpus_manifest(m)
        return m

    def read_corpus_part(self, part: CorpusPart, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(part.path, columns=columns)

    # ---- teachers ------------------------------------------------------------------------
    def teacher_path(self, name: str) -> Path:
        return self.root / "teachers" / f"{name}.json"

    def teachers(self) -> dict[str, TeacherRecord]:
        base = self.root / "teachers"
        out = {}
        for p in sorted(base.glob("*.json")) if base.exists() else []:
            rec = TeacherRecord(**json.loads(p.read_text()))
            out[rec.name] = rec
        return out

    def teacher(self, name: str) -> TeacherRecord:
        path = self.teacher_path(name)
        if not path.exists():
            known = ", ".join(self.teachers()) or "none"
            raise StoreError(f"{self.root}: no teacher {name!r} (teachers in the store: {known})")
        return TeacherRecord(**json.loads(path.read_text()))

    def write_teacher(self, rec: TeacherRecord) -> None:
        atomic_write_json(self.teacher_path(rec.name), asdict(rec))

    # ---- labels --------------------------------------------------------------------------
    def label_path(self, teacher: str, corpus: str, part: int) -> Path:
        return self.root / "labels" / teacher / corpus / part_name(part)

    def label_files(self) -> list[Path]:
        """Every committed label file (temporaries are hidden files and never match)."""
        base = self.root / "labels"
        return sorted(base.glob("*/*/part-*.parquet")) if base.exists() else []

    @staticmethod
    def label_meta(path: Path) -> dict:
        kv = pq.read_schema(path).metadata or {}
        if META_KEY not in kv:
            raise StoreError(f"{path}: not a tmkd label part (no tmkd metadata)")
        return json.loads(kv[META_KEY])

    def check_label(self, teacher: TeacherRecord, part: CorpusPart) -> LabelCheck:
        """Cheap check from the file footer: is this unit committed with current fingerprints?"""
        path = self.label_path(teacher.name, part.corpus, part.part)
        if not path.exists():
            return LabelCheck("missing")
        try:
            meta = self.label_meta(path)
        except Exception as e:  # unreadable footer: a corrupt file
            return LabelCheck("bad", f"unreadable: {e}")
        if meta.get("schema_version") != SCHEMA_VERSION:
            return LabelCheck("stale", f"schema version {meta.get('schema_version')} != {SCHEMA_VERSION}")
        if meta.get("fingerprint") != teacher.fingerprint:
            return LabelCheck("stale", "teacher fingerprint changed")
        if meta.get("corpus_part_digest") != part.digest:
            return LabelCheck("stale", "corpus part digest changed")
        return LabelCheck("ok")

    def write_label_part(
        self,
        teacher: TeacherRecord,
        part: CorpusPart,
        ids: np.ndarray,
        logits: np.ndarray,
        store_dtype: str = "float32",
        compute_dtype: str = "float32",
    ) -> Path:
        """Commit one (teacher, corpus part) label file atomically."""
        path = self.label_path(teacher.name, part.corpus, part.part)
        remove_stale_tmp(path)
        n, k = logits.shape
        values = pa.array(logits.astype(np.float16 if store_dtype == "float16" else np.float32).reshape(-1))
        table = pa.table({"id": pa.array(ids, pa.int64()), "logits": pa.FixedSizeListArray.from_arrays(values, k)})
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
        atomic_write_parquet(
            path, table, compression="zstd", use_dictionary=["id"], use_byte_stream_split=bss, write_statistics=["id"]
        )
        return path

    def read_aligned(self, part: CorpusPart, teachers: list[TeacherRecord], columns: list[str] | None = None):
        """Read a corpus part with its teachers' logits, zipped by position.

        Returns (corpus table, logits array of shape [rows, teachers, labels], float32).
        Raises StaleLabelsError naming the file if a label part is missing, stale or misaligned.
        """
        cols = None if columns is None else list(dict.fromkeys(["id", *columns]))
        table = self.read_corpus_part(part, cols)
        ids = table.column("id").to_numpy()
        stacked = []
        for t in teachers:
            check = self.check_label(t, part)
            path = self.label_path(t.name, part.corpus, part.part)
            if check.status != "ok":
                what = {"missing": "missing", "stale": "stale", "bad": "unreadable"}[check.status]
                raise StaleLabelsError(
                    f"{path}: label part {what} for teacher {t.name!r}, corpus {part.corpus!r} part {part.part}"
                    + (f" ({check.reason})" if check.reason else "")
                    + "; run `tmkd-label run` to score it"
                )
            labels = pq.read_table(path)
            lab_ids = labels.column("id").to_numpy()
            if len(lab_ids) != len(ids) or not np.array_equal(lab_ids, ids):
                bad = int(np.argmax(lab_ids != ids)) if len(lab_ids) == len(ids) else min(len(ids), len(lab_ids))
                raise StaleLabelsError(
                    f"{path}: ids do not match corpus part {part.path.name} "
                    f"({len(lab_ids)} vs {len(ids)} rows, first mismatch at row {bad})"
                )
            stacked.append(logits_to_numpy(labels.column("logits")))
        logits = np.stack(stacked, axis=1) if stacked else np.zeros((len(ids), 0, 0), np.float32)
        return table, logits

    # ---- quarantine and run logs ---------------------------------------------------------
    def quarantine_path(self, corpus: str) -> Path:
        return self.root / "quarantine" / corpus / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.jsonl"

    def write_run_log(self, record: dict, rank: int) -> Path:
        path = self.root / "runs" / f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-rank{rank}.json"
        atomic_write_json(path, record)
        return path

    def run_logs(self) -> list[dict]:
        base = self.root / "runs"
        return [json.loads(p.read_text()) for p in sorted(base.glob("*.json"))] if base.exists() else []


def logits_to_numpy(column: pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column of floats -> float32 array [rows, labels], without a Python loop."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = arr.type.list_size
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, width).astype(np.float32, copy=False)
