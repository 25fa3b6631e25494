"""`tmkd-label verify`: is the store complete and consistent? Name every problem found.

Checks, for each corpus: every manifest part exists with its recorded row count and digest,
and ids are unique across the corpus. For each teacher and each corpus it scores: every
part has a label file with the current fingerprint and corpus digest, the same ids in the
same order, one logit per label, and only finite logits. Label files nobody expects
(unknown teacher, corpus or part) are reported too.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq

from pipeline.store import PART_RE, Store, file_digest, logits_to_numpy


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    corpora: int = 0
    corpus_parts: int = 0
    teachers: int = 0
    label_parts: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify(store: Store) -> VerifyReport:
    report = VerifyReport()
    teachers = store.teachers()
    report.teachers = len(teachers)
    corpus_ids: dict[tuple[str, int], np.ndarray] = {}
    manifests = {c: store.corpus(c) for c in store.corpora()}
    report.corpora = len(manifests)

    for name, m in manifests.items():
        all_ids = []
        for p in m.parts:
            report.corpus_parts += 1
            if not p.path.exists():
                report.problems.append(f"{p.path}: corpus part listed in the manifest is missing")
                continue
            if file_digest(p.path) != p.digest:
                report.problems.append(f"{p.path}: digest differs from the manifest (the part was modified)")
            ids = pq.read_table(p.path, columns=["id"]).column("id").to_numpy()
            if len(ids) != p.rows:
                report.problems.append(f"{p.path}: {len(ids)} rows, the manifest says {p.rows}")
            corpus_ids[(name, p.part)] = ids
            all_ids.append(ids)
        if all_ids:
            ids = np.concatenate(all_ids)
            uniq, counts = np.unique(ids, return_counts=True)
            if len(uniq) != len(ids):
                report.problems.append(f"corpus {name!r}: {int((counts > 1).sum())} ids occur more than once")

    for t in teachers.values():
        for name, m in manifests.items():
            if not t.scores(name):
                continue
            if m.label_names is not None and len(m.label_names) != len(t.label_names):
                report.problems.append(
                    f"teacher {t.name!r}: {len(t.label_names)} labels but corpus {name!r} has {len(m.label_names)}"
                )
            for p in m.parts:
                path = store.label_path(t.name, name, p.part)
                check = store.check_label(t, p)
                if check.status != "ok":
                    what = "missing (not scored yet)" if check.status == "missing" else check.reason
                    report.problems.append(f"{path}: {what}")
                    continue
                report.label_parts += 1
                table = pq.read_table(path)
                ids = table.column("id").to_numpy()
                expected = corpus_ids.get((name, p.part))
                if expected is not None and not np.array_equal(ids, expected):
                    if len(ids) != len(expected):
                        report.problems.append(f"{path}: {len(ids)} rows, corpus part has {len(expected)}")
                    else:
                        row = int(np.argmax(ids != expected))
                        report.problems.append(
                            f"{path}: ids not aligned with corpus part {p.path.name} (first mismatch at row {row})"
                        )
                logits = logits_to_numpy(table.column("logits"))
                if logits.shape[1] != len(t.label_names):
                    report.problems.append(f"{path}: {logits.shape[1]} logits per row, teacher has {len(t.label_names)} labels")
                bad = ~np.isfinite(logits).all(axis=1)
                if bad.any():
                    report.problems.append(
                        f"{path}: {int(bad.sum())} rows with NaN/inf logits (first at row {int(np.argmax(bad))})"
                    )

    for f in store.label_files():
        teacher, corpus = f.parent.parent.name, f.parent.name
        match = PART_RE.match(f.name)
        part = int(match.group(1)) if match else -1
        t = teachers.get(teacher)
        if t is None:
            report.problems.append(f"{f}: label part of unknown teacher {teacher!r}")
        elif corpus not in manifests:
            report.problems.append(f"{f}: label part of unknown corpus {corpus!r}")
        elif part not in {p.part for p in manifests[corpus].parts}:
            report.problems.append(f"{f}: label part for a corpus part that does not exist")
        elif not t.scores(corpus):
            report.problems.append(f"{f}: teacher {teacher!r} is not set to score corpus {corpus!r}")
    return report
