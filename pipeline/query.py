"""`tmkd-label query`: DuckDB SQL over the store, with no way to touch a file.

The store is opened with pyarrow, not by DuckDB. ``labels`` is a ``pyarrow.dataset`` over the
committed parts that pass the store's checks (``Store.check_label``, the rule `run`, `verify`
and the trainer apply: digest, page checksums, ids, finite logits; page checksums are
verified again while DuckDB scans). ``corpus`` and ``scores`` are streams that check each part
by the same rule as DuckDB reads it (``pipeline/streams.py``). The DuckDB connection itself runs with
``enable_external_access = false``, no allowed directories, no temp folder, no extension
loading, no replacement scans of Python variables, and its configuration locked.
So no statement can read or write any file, whatever its type (COPY, EXPORT, ATTACH,
EXPLAIN ANALYZE COPY, read_text, glob, ...): they fail with DuckDB's permission error, and
everything else (PIVOT, SUMMARIZE, CREATE TEMP TABLE, ...) only ever sees memory.

Views:

- ``corpus``   (corpus, part, id, text_a, text_b, label, "group")
- ``labels``   (teacher, corpus, part, row, id, logits FLOAT[]) — current, intact label parts only;
  ``row`` is the position in the part, the same for every teacher (parts are aligned)
- ``scores``   (corpus, part, row, id, label, "group", <one FLOAT[] column per teacher>) — one row per
  pair, built part by part with no join, checked as DuckDB reads it
- ``teachers`` (name, fingerprint, path, label_names, dtype, max_length)
- ``corpora``  (corpus, label_names, parts, "rows")

Only the views a query's text names are checked and registered: a view it does not name does not
exist for it. Macros: ``predicted(logits)`` (the argmax, 0-based) and ``probs(logits)`` (the softmax).

Parts left out (damaged corpus parts, stale or damaged label parts, label files no view can
show) are returned with the reason, for the caller to report: a view never shrinks silently.
A part rewritten while the query ran (its inode, size or mtime changed since it was checked)
discards the result with an error, so a result is always computed from checked bytes.
"""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from concurrent.futures import ThreadPoolExecutor

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds

from tmkd.data.fs import ObjectPath, inside_store, output_file
from tmkd.data.store import PART_RE, CorruptPartError, Store, StoreError, scored_corpora
from tmkd.pipeline.streams import CorpusView, ScoresView


class QueryError(StoreError):
    """DuckDB reported an error (a refused file access, a SQL error); the message is DuckDB's."""


@dataclass
class LeftOut:
    """Parts a view leaves out, with the reason: reported on stderr by the CLI."""

    corpus_parts: list[str] = field(default_factory=list)  # "corpus/part (reason)"
    label_parts: list[str] = field(default_factory=list)  # "teacher/corpus/part (reason)"
    checked: dict = field(default_factory=dict)  # path -> identity of the file as checked


def _identity(path) -> tuple:
    """What changes when a file is replaced or rewritten: inode, size, modification time (an
    object's e_tag and size in an object store)."""
    if isinstance(path, ObjectPath):
        head = path.head()
        if head is None:
            raise FileNotFoundError(str(path))
        return head["e_tag"], head["size"]
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


LABELS_SCHEMA = pa.schema([("teacher", pa.string()), ("corpus", pa.string()), ("part", pa.int32()),
                           ("row", pa.int32()), ("id", pa.int64())])
# Parquet page checksums are verified as DuckDB scans the parts.
PARQUET = ds.ParquetFileFormat(
    default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True))
CHECK_THREADS = 4  # parts checked at once before a query (sha256 and Parquet decoding release the GIL)
LOCKED = {
    "enable_external_access": False,  # no file, network or extension access from SQL (none allowed)
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_persistent_secrets": False,
    "python_enable_replacements": False,  # SQL cannot reach the caller's Python variables
}


def _dataset(store: Store, paths: list, schema: pa.Schema, partitions: list[ds.Expression]) -> ds.Dataset:
    """One Arrow dataset over files (local, or objects read through pyarrow's S3/GCS filesystem); the
    constant columns (corpus, part, ...) come from ``partitions``."""
    if isinstance(store.root, ObjectPath):
        filesystem, paths = store.root.arrow_filesystem(), [p.arrow_path() for p in paths]
    else:
        filesystem, paths = pa.fs.LocalFileSystem(), [str(p) for p in paths]
    return ds.FileSystemDataset.from_paths(paths, schema=schema, format=PARQUET, filesystem=filesystem,
                                           partitions=partitions)


def _const(**values) -> ds.Expression:
    expr = None
    for k, v in values.items():
        e = ds.field(k) == v
        expr = e if expr is None else expr & e
    return expr


VIEWS = ("corpus", "labels", "scores", "teachers", "corpora")
MACROS = (  # helpers over a logits list, in every query
    "CREATE MACRO predicted(logits) AS list_position(logits, list_max(logits)) - 1",  # the argmax, 0-based like label
    "CREATE MACRO probs(logits) AS list_transform(logits, lambda x: exp(x - list_max(logits)) / "
    "list_sum(list_transform(logits, lambda y: exp(y - list_max(logits)))))",  # softmax
)


def referenced_views(sql: str) -> set[str]:
    """The views a SQL text names (as a word, anywhere: an over-estimate is only slower). A view it
    does not name is neither checked nor registered, so it cannot be read unchecked."""
    return {v for v in VIEWS if re.search(rf"\b{v}\b", sql, re.IGNORECASE)}


def build_views(store: Store, wanted: set[str] | None = None,
                only: set[str] | None = None) -> tuple[dict[str, object], LeftOut]:
    """The Arrow objects behind the views (``wanted``: these only, default all), over intact committed
    parts of every corpus (``only``: of these); and what was left out."""
    wanted = set(VIEWS) if wanted is None else wanted
    left = LeftOut()
    manifests = {c: store.corpus(c) for c in store.corpora() if only is None or c in only}
    teachers = store.teachers()

    scoring = {name: [] for name in manifests}  # corpus -> teachers whose label space fits it
    for t, name, m, mismatch in scored_corpora(teachers.values(), manifests):
        if mismatch:
            if wanted & {"labels", "scores"}:
                left.label_parts.append(f"{t.name}/{name}/* ({mismatch})")
        else:
            scoring[name].append(t)

    def check_part(name: str, p):
        """A corpus part (digest, checksums, rows) and its teachers' label parts (the one rule, in full)."""
        try:
            ids = store.read_corpus_part(p, ["id"]).column("id").to_numpy()
        except CorruptPartError as e:
            return str(e).split(": ", 1)[1], []
        checks = [(t, store.check_label(t, p, corpus_ids=ids)) for t in scoring[name]] if "labels" in wanted else []
        for _, check in checks:
            check.table = None  # checked; DuckDB reads the file itself: memory stays flat
        return None, checks

    work = [(name, p) for name, m in manifests.items() for p in m.parts]
    views: dict[str, object] = {}
    if "scores" in wanted:  # checked as DuckDB reads them (pipeline/streams.py): nothing to do now
        views["scores"] = ScoresView(store, work, scoring, left)
    if "corpus" in wanted:
        views["corpus"] = CorpusView(store, work, left)
    if "labels" in wanted:  # a dataset (DuckDB pushes teacher filters down to it): every part checked first
        with ThreadPoolExecutor(CHECK_THREADS) as pool:  # hashing and decoding release the GIL
            checked = list(pool.map(lambda job: check_part(*job), work))
        views["labels"] = _labels_dataset(store, work, checked, left)
    if wanted & {"labels", "scores"}:
        left.label_parts += _unshown_label_files(store, teachers, manifests, left, set(store.corpora()))

    teacher_rows = pa.table({
        "name": [t.name for t in teachers.values()],
        "fingerprint": [t.fingerprint for t in teachers.values()],
        "path": [t.path for t in teachers.values()],
        "label_names": pa.array([t.label_names for t in teachers.values()], pa.list_(pa.string())),
        "dtype": [t.dtype for t in teachers.values()],
        "max_length": pa.array([t.max_length for t in teachers.values()], pa.int32()),
    })
    corpora_rows = pa.table({
        "corpus": list(manifests),
        "label_names": pa.array([m.label_names for m in manifests.values()], pa.list_(pa.string())),
        "parts": pa.array([len(m.parts) for m in manifests.values()], pa.int32()),
        "rows": pa.array([m.rows for m in manifests.values()], pa.int64()),
    })
    views.update(teachers=teacher_rows, corpora=corpora_rows)
    return {name: obj for name, obj in views.items() if name in wanted}, left


def _labels_dataset(store: Store, work: list, checked: list, left: LeftOut) -> ds.Dataset:
    """The labels view: an Arrow dataset over the label parts that passed their checks."""
    label_paths, label_parts = [], []
    for (name, p), (corpus_problem, labels) in zip(work, checked):
        if corpus_problem:
            left.corpus_parts.append(f"{name}/{p.part} ({corpus_problem})")
            continue  # no label of a damaged corpus part is shown either
        for t, check in labels:
            if check.status != "ok":
                if check.invalid:
                    left.label_parts.append(f"{t.name}/{name}/{p.part} ({check.status}: {check.reason})")
                continue
            label_paths.append(check.path)
            label_parts.append(_const(teacher=t.name, corpus=name, part=p.part))
            left.checked[label_paths[-1]] = _identity(label_paths[-1])
    return _dataset(store, label_paths, LABELS_SCHEMA.append(pa.field("logits", pa.list_(pa.float32()))), label_parts)


def _unshown_label_files(store: Store, teachers: dict, manifests: dict, left: LeftOut, corpora: set[str]) -> list[str]:
    """Label parts on disk that no view can show (unknown teacher or corpus, ...): never silently. Those of
    a corpus of the store that the views leave out on purpose (``only``) are not counted."""
    out = []
    for f in store.label_files():
        teacher, cname = f.parent.parent.name, f.parent.name
        if f in left.checked or (cname in corpora and cname not in manifests):
            continue
        t, m = teachers.get(teacher), manifests.get(cname)
        match = PART_RE.match(f.name)  # part-NNNNN.parquet, or part-NNNNN.<commit>.parquet on an object store
        part = int(match.group(1)) if match else -1
        why = ("unknown teacher" if t is None else "unknown corpus" if m is None
               else "no such corpus part" if part not in {p.part for p in m.parts}
               else f"teacher not set to score corpus {cname!r}" if not t.scores(cname) else None)
        if why:
            out.append(f"{teacher}/{cname}/{f.name} ({why})")
    return out


def _locked_connection() -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB that can touch no file.

    DuckDB always allows the paths ``<cwd>/:memory:`` (and its .wal files) even with external
    access off, so the connection is opened inside an empty folder that is removed at once:
    those paths then point into a folder that no longer exists, and nothing can be created there.
    There is no temp folder either (no spilling to disk: a query runs in memory)."""
    here = os.getcwd()
    scratch = tempfile.mkdtemp(prefix="tmkd-query-")
    try:
        os.chdir(scratch)
        return duckdb.connect(":memory:", config={**LOCKED, "temp_directory": "", "lock_configuration": True})
    finally:
        os.chdir(here)
        os.rmdir(scratch)


@contextmanager
def connect_views(views: dict[str, object]):
    """A locked in-memory DuckDB with ``views`` registered and the macros defined."""
    con = _locked_connection()
    try:
        for name, obj in views.items():  # the logits' fixed-size lists are read as FLOAT[] (the schema above)
            con.register(name, obj)
        for macro in MACROS:
            con.execute(macro)
        yield con
    finally:
        con.close()


@contextmanager
def connect(store: Store, sql: str | None = None):
    """An in-memory DuckDB over the store's views (those ``sql`` names; default all), with no file
    access; yields (connection, left out)."""
    views, left = build_views(store, None if sql is None else referenced_views(sql))
    with connect_views(views) as con:
        yield con, left


def changed_since_checked(left: LeftOut) -> list[str]:
    """Files the views read that were replaced or rewritten after they were checked."""
    changed = []
    for path, ident in left.checked.items():
        try:
            if _identity(path) != ident:
                changed.append(str(path))
        except FileNotFoundError:
            changed.append(str(path))
    return changed


def _execute(con, sql: str, stream: bool = False):
    """Run every statement; return the last one's result (``stream``: as a lazy relation, whose rows
    DuckDB produces batch by batch as they are read)."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as e:
        raise QueryError(str(e)) from None
    if not statements:
        raise QueryError("no SQL statement given")
    try:
        for s in statements[:-1]:
            con.execute(s.query)
        if not stream:
            return con.execute(statements[-1].query)
        relation = con.sql(statements[-1].query)
        if relation is None:
            raise QueryError("the last statement returns no rows to write")
        return relation
    except duckdb.Error as e:
        raise QueryError(str(e)) from None


def _refuse_if_changed(left: LeftOut) -> None:
    changed = changed_since_checked(left)
    if changed:  # a part checked before the query is not the part the query read: never return that
        raise QueryError(f"the store changed while the query ran ({len(changed)} part(s) rewritten, e.g. "
                         f"{changed[0]}); the result is discarded: run the query again")


def run_query(store: Store, sql: str):
    """Run SQL (any statements); return (column names, rows of the last statement, left out)."""
    with connect(store, sql) as (con, left):
        result = _execute(con, sql)
        try:
            columns = [d[0] for d in result.description] if result.description else []
            rows = result.fetchall()
        except duckdb.Error as e:
            raise QueryError(str(e)) from None
    _refuse_if_changed(left)
    return columns, rows, left


OUTPUT_FORMATS = ("parquet", "csv", "jsonl")


def write_query(store: Store, sql: str, output: Path, fmt: str) -> tuple[int, LeftOut]:
    """Run SQL and stream the last statement's result into ``output`` (parquet, csv or jsonl), one Arrow
    record batch at a time: the result is never held in memory whole. pyarrow writes the file, not
    DuckDB (which keeps no file access), under a temporary name renamed once the result is complete
    and the parts it read are unchanged. Returns (rows written, left out)."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    if fmt not in OUTPUT_FORMATS:
        raise QueryError(f"--output {output}: format {fmt!r}; use one of {', '.join(OUTPUT_FORMATS)} "
                         "(from the file's suffix, or --output-format)")
    output = Path(output).absolute()
    if inside_store(output, store.root):
        raise QueryError(f"--output {output}: inside the store {store.root}; a query never writes into a store")
    try:
        output = output_file(output)
    except OSError as e:
        raise QueryError(f"--output {e}; leave --output out to print the result (--format csv or jsonl)") from None
    tmp = output.with_name(f".{output.name}.{uuid.uuid4().hex}.tmp")
    rows = 0
    with connect(store, sql) as (con, left):
        relation = _execute(con, sql, stream=True)
        try:
            with open(tmp, "wb") as f:
                batches = relation.to_arrow_reader(65_536)  # a RecordBatchReader: streamed, batch by batch
                if fmt == "parquet":
                    writer = pq.ParquetWriter(f, batches.schema, compression="zstd")
                elif fmt == "csv":
                    writer = pacsv.CSVWriter(f, batches.schema)
                else:
                    writer = None
                for batch in batches:
                    if writer is not None:
                        writer.write_batch(batch)
                    else:  # JSON lines; NaN and infinities (not JSON) as null
                        f.write("".join(json.dumps(finite(r), default=str, allow_nan=False) + "\n"
                                        for r in batch.to_pylist()).encode())
                    rows += batch.num_rows
                if writer is not None:
                    writer.close()
            _refuse_if_changed(left)
            os.replace(tmp, output)
        except duckdb.Error as e:
            tmp.unlink(missing_ok=True)
            raise QueryError(str(e)) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return rows, left


def finite(v):
    """``v`` with NaN and infinities (not JSON) replaced by None, in nested lists and dicts."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [finite(x) for x in v]
    return v
