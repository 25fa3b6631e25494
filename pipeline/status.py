"""Coverage of the store: for each teacher × corpus, how many parts carry current labels.

By default from the commit records alone: a part is done when its record names the current
teacher fingerprint, corpus part digest and schema, and its data file is there at the recorded
size. No byte of a part is read, so `status` answers in seconds on a store of millions of pairs,
local or in a bucket (the records are read by 16 threads). ``full=True`` (`status --full`)
applies the whole rule instead (``Store.check_label``: every byte hashed and decoded, as
`verify`, `run`, `query` and the trainer do).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tmkd.data.store import CorruptPartError, Store


@dataclass
class Coverage:
    teacher: str
    corpus: str
    done: int
    stale: int  # committed but stale or damaged: `run` scores them again
    total: int
    rows_done: int
    rows_total: int


def _committed(store: Store, teacher, part) -> str:
    """ok / missing / stale / bad, from the commit record and the data file's size."""
    check = store.check_commit(teacher, part)
    if check.status != "ok":
        return check.status
    return "bad" if store.label_size_problem(check) else "ok"


def _checked(store: Store, teachers: list, part) -> list[str]:
    """The whole rule, every byte: each corpus part is read once, for all its teachers."""
    try:
        ids = store.read_corpus_part(part, ["id"]).column("id").to_numpy()
    except CorruptPartError:
        return ["bad"] * len(teachers)  # a damaged corpus part: no label of it can be trusted
    return [store.check_label(t, part, corpus_ids=ids).status for t in teachers]


def coverage(store: Store, full: bool = False) -> list[Coverage]:
    """One row per (teacher, corpus it scores): parts done, stale or damaged, missing."""
    teachers = list(store.teachers().values())
    out = []
    with ThreadPoolExecutor(1 if full else 16) as pool:
        for name in store.corpora():
            m = store.corpus(name)
            mine = [t for t in teachers if t.scores(name)]
            if full:
                per_part = list(pool.map(lambda p: _checked(store, mine, p), m.parts))
            else:
                flat = list(pool.map(lambda tp: _committed(store, *tp), [(t, p) for p in m.parts for t in mine]))
                per_part = [flat[i * len(mine):(i + 1) * len(mine)] for i in range(len(m.parts))]
            status = {t.name: [row[j] for row in per_part] for j, t in enumerate(mine)}
            out.extend(_rows(name, m, mine, status))
    return sorted(out, key=lambda c: (c.teacher, c.corpus))


def _rows(name: str, m, mine: list, status: dict[str, list[str]]) -> list[Coverage]:
    return [Coverage(t.name, name, done=s.count("ok"), stale=sum(x in ("stale", "bad") for x in s),
                     total=len(m.parts), rows_done=sum(p.rows for p, x in zip(m.parts, s) if x == "ok"),
                     rows_total=m.rows)
            for t, s in ((t, status[t.name]) for t in mine)]
