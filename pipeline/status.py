"""Coverage of the store: for each teacher × corpus, how many parts carry current labels."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.store import Store


@dataclass
class Coverage:
    teacher: str
    corpus: str
    done: int
    stale: int
    total: int
    rows_done: int
    rows_total: int


def coverage(store: Store) -> list[Coverage]:
    """One row per (teacher, corpus it scores); reads only manifests and Parquet footers."""
    out = []
    manifests = {c: store.corpus(c) for c in store.corpora()}
    for teacher in store.teachers().values():
        for name, m in manifests.items():
            if not teacher.scores(name):
                continue
            checks = [(p, store.check_label(teacher, p).status) for p in m.parts]
            out.append(
                Coverage(
                    teacher.name, name,
                    done=sum(s == "ok" for _, s in checks),
                    stale=sum(s in ("stale", "bad") for _, s in checks),
                    total=len(m.parts),
                    rows_done=sum(p.rows for p, s in checks if s == "ok"),
                    rows_total=m.rows,
                )
            )
    return out
