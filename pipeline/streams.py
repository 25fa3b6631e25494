"""Views checked as DuckDB reads them: ``scores`` (one row per pair, one logits column per teacher) and
``corpus`` (the pairs and their texts).

The ``labels`` view has one row per (teacher, pair), so comparing teachers needs a join per
teacher: at 10M pairs × 3 teachers, two hash joins took ~3.5 s on 2 cores. But a store's label
parts are aligned with their corpus part (row i of every teacher's part is row i of the corpus
part), so the wide table can be built part by part with no join at all.

DuckDB scans these objects through the Arrow C stream interface, asking for a fresh stream for
each scan. Each stream reads a corpus part (and, for ``scores``, its teachers' label parts),
checks it by the one rule (digest, page checksums, schema, rows, ids, finite logits:
``Store.read_corpus_part`` and ``Store.check_label``), and only then yields it. The bytes DuckDB
sees are the bytes that were checked (decoded from the hashed buffer), so nothing can change in
between, and parts are read a few at a time: memory stays flat, whatever DuckDB does with the rows
(``query --output`` writes 2M or 8M rows in the same memory). A damaged part is left out of the
stream and reported, like in the other views.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from tmkd.data.store import (CORPUS_SCHEMA, CorruptPartError, Store, StoreError, TeacherRecord, logits_to_numpy,
                             teacher_name_clash)

LOGITS = pa.list_(pa.float32())
KEYS = pa.schema([("corpus", pa.string()), ("part", pa.int32()), ("row", pa.int32()), ("id", pa.int64()),
                  ("label", pa.int32()), ("group", pa.string())])
THREADS = min(8, os.cpu_count() or 1)  # parts checked at once (sha256 and Parquet decoding release the GIL)
AHEAD = 8  # parts checked ahead of the one DuckDB is reading: memory stays flat


class CheckedStream:
    """What ``con.register(name, ...)`` takes: a schema, and a new checked stream per scan.
    Subclasses say what a part is (``_check_part``: the batch, or None, and the problems found)."""

    schema: pa.Schema

    def __init__(self, store: Store, parts: list, left):
        self.store, self.parts, self.left = store, parts, left
        self.damaged: set[tuple[str, str, int]] = set()  # (teacher, corpus, part) label parts left out as invalid
        self.damaged_corpus: set[tuple[str, int]] = set()  # (corpus, part) corpus parts left out
        self.seen: dict[tuple[str, str, int], str] = {}  # (teacher, corpus, part) -> label digest the first scan read

    def __arrow_c_schema__(self):
        return self.schema.__arrow_c_schema__()

    def __arrow_c_stream__(self, requested_schema=None):
        return pa.RecordBatchReader.from_batches(self.schema, self._batches()).__arrow_c_stream__(requested_schema)

    def _report(self, kind: str, what: str) -> None:
        reported = self.left.corpus_parts if kind == "corpus" else self.left.label_parts
        if what not in reported:  # a part read twice (two scans, or two views) is reported once
            reported.append(what)

    def _batches(self):
        pool = ThreadPoolExecutor(THREADS)
        pending: deque = deque()
        todo = iter(self.parts)
        try:
            for job in todo:
                pending.append(pool.submit(self._check_part, *job))
                if len(pending) >= AHEAD:
                    yield from self._take(pending.popleft().result())
            while pending:
                yield from self._take(pending.popleft().result())
        finally:  # DuckDB may stop reading early (LIMIT): drop what is queued
            pool.shutdown(wait=True, cancel_futures=True)

    def _take(self, checked):
        batch, problems = checked
        for kind, what, key in problems:
            if kind == "read":  # a label part read: the same one in every scan of this query, or no result
                if self.seen.setdefault(key, what) != what:
                    raise StoreError(f"the store changed while the query ran (label part {'/'.join(map(str, key))} "
                                     "was committed again between two scans); the result is discarded: run it again")
                continue
            self._report("label" if kind == "stale" else kind, what)
            if kind == "corpus":
                self.damaged_corpus.add(key)
            elif kind == "label":
                self.damaged.add(key)
        if batch is not None:
            yield batch

    def _check_part(self, name: str, part) -> tuple[pa.RecordBatch | None, list[tuple]]:
        raise NotImplementedError

    def _read_corpus(self, name: str, part, columns: list[str]):
        """(the checked corpus part, None) or (None, the problem that leaves it out)."""
        try:
            return self.store.read_corpus_part(part, columns), None
        except CorruptPartError as e:
            return None, ("corpus", f"{name}/{part.part} ({str(e).split(': ', 1)[1]})", (name, part.part))


def _const(name: str, part: int, n: int) -> list[pa.Array]:
    return [pa.repeat(pa.scalar(name, pa.string()), n), pa.repeat(pa.scalar(part, pa.int32()), n)]


class CorpusView(CheckedStream):
    """The ``corpus`` view: (corpus, part, id, text_a, text_b, label, group) of every checked corpus part."""

    schema = pa.schema([("corpus", pa.string()), ("part", pa.int32())]
                       + [CORPUS_SCHEMA.field(n) for n in ("id", "text_a", "text_b", "label", "group")])

    def _check_part(self, name: str, part) -> tuple[pa.RecordBatch | None, list[tuple]]:
        table, problem = self._read_corpus(name, part, ["id", "text_a", "text_b", "label", "group"])
        if problem:
            return None, [problem]
        columns = _const(name, part.part, table.num_rows) + [c.combine_chunks() for c in table.columns]
        return pa.record_batch(columns, schema=self.schema), []


class ScoresView(CheckedStream):
    """The ``scores`` view. ``scoring`` maps each corpus to the teachers set to score it; a teacher's
    column is NULL where it does not score the corpus, has not scored the part (missing, stale), or
    its part is damaged (then reported in ``left``)."""

    def __init__(self, store: Store, parts: list, scoring: dict[str, list[TeacherRecord]], left):
        super().__init__(store, [(name, p) for name, p in parts if scoring.get(name)], left)
        self.scoring = scoring
        self.teachers = sorted({t.name for ts in scoring.values() for t in ts})
        for name in self.teachers:  # a store written before names were checked (Store.write_teacher)
            problem = teacher_name_clash(name, self.teachers)
            if problem:
                raise StoreError(f"the scores view cannot show this store's teachers: {problem}; use the labels view")
        self.schema = pa.schema(list(KEYS) + [pa.field(n, LOGITS) for n in self.teachers])

    def _check_part(self, name: str, part) -> tuple[pa.RecordBatch | None, list[tuple]]:
        """One corpus part and its teachers' label parts, checked; the wide batch and what was left out."""
        corpus, problem = self._read_corpus(name, part, ["id", "label", "group"])
        if problem:
            return None, [problem]
        ids = corpus.column("id").to_numpy()
        n = len(ids)
        columns = _const(name, part.part, n) + [
            pa.array(np.arange(n, dtype=np.int32)), pa.array(ids, pa.int64()),
            corpus.column("label").cast(pa.int32()).combine_chunks(), corpus.column("group").combine_chunks()]
        problems = []
        scorers = {t.name: t for t in self.scoring[name]}
        for teacher in self.teachers:
            check = self.store.check_label(scorers[teacher], part, corpus_ids=ids) if teacher in scorers else None
            if check is None or check.status != "ok":
                if check is not None and check.invalid:
                    problems.append(("label" if check.status == "bad" else "stale",
                                     f"{teacher}/{name}/{part.part} ({check.status}: {check.reason})",
                                     (teacher, name, part.part)))
                columns.append(pa.nulls(n, LOGITS))
                continue
            problems.append(("read", check.record.get("digest"), (teacher, name, part.part)))
            logits = logits_to_numpy(check.table.column("logits"))
            offsets = pa.array(np.arange(0, logits.size + 1, logits.shape[1], dtype=np.int32))
            columns.append(pa.ListArray.from_arrays(offsets, pa.array(logits.reshape(-1))))
        return pa.record_batch(columns, schema=self.schema), problems
