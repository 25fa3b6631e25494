"""Coverage of the store: for each teacher × corpus, how many parts carry current, intact labels."""
from __future__ import annotations

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


def coverage(store: Store) -> list[Coverage]:
    """One row per (teacher, corpus it scores). A part counts as done only if it passes the store's
    one rule (``Store.check_label``), as in `run`, `verify`, `query` and the trainer."""
    teachers = list(store.teachers().values())
    out = []
    for name in store.corpora():
        m = store.corpus(name)
        mine = [t for t in teachers if t.scores(name)]
        status = {t.name: [] for t in mine}
        for p in m.parts:  # each corpus part is read once, for all its teachers
            try:
                ids = store.read_corpus_part(p, ["id"]).column("id").to_numpy()
            except CorruptPartError:
                ids = None  # a damaged corpus part: no label of it can be trusted
            for t in mine:
                status[t.name].append("bad" if ids is None else store.check_label(t, p, corpus_ids=ids).status)
        for t in mine:
            s = status[t.name]
            out.append(Coverage(
                t.name, name,
                done=s.count("ok"),
                stale=sum(x in ("stale", "bad") for x in s),
                total=len(m.parts),
                rows_done=sum(p.rows for p, x in zip(m.parts, s) if x == "ok"),
                rows_total=m.rows,
            ))
    return sorted(out, key=lambda c: (c.teacher, c.corpus))
