"""`tmkd-label verify`: is the store complete and intact? Name every problem found.

Every corpus part is read back and checked against its manifest (digest, page checksums,
row count) and ids must be unique across a corpus. Every teacher × corpus part it scores is
checked with the store's one rule, ``Store.check_label`` (commit record, current fingerprint
and corpus digest, file digest, page checksums, schema, one logit per label, the corpus
part's ids in order, finite logits), and each teacher's label space against each corpus's.
Files nobody expects (stray files, label parts of unknown teachers, corpora or parts) are
problems too; temporaries of dead writers are only noted, since `run` removes them.
Nothing here writes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tmkd.data.fs import ObjectPath
from tmkd.data.store import PART_RE, CorruptPartError, Store, scored_corpora


@dataclass
class VerifyReport:
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # harmless, reported but not failing
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
            try:
                # every column, so that a part whose bytes match a (wrongly written) digest is still checked
                # against the corpus schema and the manifest's label names
                ids = store.read_corpus_part(p).column("id").to_numpy()
            except CorruptPartError as e:
                report.problems.append(f"{e} (corpus part; re-ingest or restore it: `run` refuses it)")
                continue
            corpus_ids[(name, p.part)] = ids
            all_ids.append(ids)
        if all_ids:
            ids = np.concatenate(all_ids)
            uniq, counts = np.unique(ids, return_counts=True)
            if len(uniq) != len(ids):
                report.problems.append(f"corpus {name!r}: {int((counts > 1).sum())} ids occur more than once")

    named = set()  # the data files commit records name (on an object store, a key per commit)
    for t, name, m, mismatch in scored_corpora(teachers.values(), manifests):
        if mismatch:
            report.problems.append(mismatch)
        for p in m.parts:
            if (name, p.part) not in corpus_ids:
                continue  # its corpus part is damaged: reported above
            path = store.label_path(t.name, name, p.part)
            check = store.check_label(t, p, corpus_ids=corpus_ids[(name, p.part)])
            try:
                record = store.label_commit(t.name, name, p.part)
            except CorruptPartError:
                record = None
            if record is not None:
                named.add(store.label_data_path(t.name, name, p.part, record))
            if check.status == "ok":
                report.label_parts += 1
            elif check.status == "missing":
                report.problems.append(f"{path}: missing (not scored yet; `run` scores it)")
            else:  # named by the data file the record names, where there is one
                report.problems.append(f"{check.path or path}: {check.status}: {check.reason} (`run` scores it again)")

    _unexpected_files(store, teachers, manifests, named, report)
    return report


def _unexpected_files(store: Store, teachers: dict, manifests: dict, named: set, report: VerifyReport) -> None:
    """Everything under the store that is not part of it, by the layout in data/store.py."""
    expected = {store.root / "store.json"}
    for name, m in manifests.items():
        expected.add(store.corpus_dir(name) / "manifest.json")
        expected.update(p.path for p in m.parts)
    expected.update(store.teacher_path(t) for t in teachers)
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
        elif isinstance(store.root, ObjectPath) and f not in named:
            report.notes.append(f"{f}: a data object no commit record names (its writer stopped before committing, "
                                "or a later commit replaced it); `run` removes it")
        expected.add(f)
        if part >= 0:
            expected.add(store.commit_path(store.label_path(teacher, corpus, part)))
    if isinstance(store.root, ObjectPath):  # every key, odd ones included (a//b: named as stray below)
        found = [ObjectPath(store.root.bucket, k) for k in store.root.walk_keys()]
    else:
        found = (p for p in store.root.rglob("*") if p.is_file())
    for f in sorted(found):
        top = f.relative_to(store.root).parts[0]
        if f in expected or top in ("quarantine", "runs", "claims"):
            continue
        if f == store.root / "ingest.lock":
            report.notes.append(f"{f}: an ingest into this store is running (or was killed: then remove it)")
            continue
        if f.name.startswith(".") and f.name.endswith(".tmp"):
            top_folder = f.relative_to(store.root).parts[0]
            cleaner = ("`run` removes it once its claim has expired" if top_folder == "labels"
                       else "nothing reads it; remove it when no ingest or run is going on")
            report.notes.append(f"{f}: temporary file of a writer that is running or was killed ({cleaner})")
        elif f.name.endswith(".commit.json") and not f.with_name(f.name.replace(".commit.json", ".parquet")).exists():
            report.problems.append(f"{f}: commit record without its label part (the part file is missing)")
        else:
            report.problems.append(f"{f}: stray file, not part of the store (remove it)")
