"""A small learnable label store for tests and smoke runs (no teacher model needed).

Rows are random word sequences; a row is positive when its passage (text_b) contains the
word "good" and negative when it contains "bad". Teacher k's logits are a known function
of that hidden label (``±scale_k`` plus seeded noise), so a student can learn from soft
labels alone. Corpora: ``train`` (gold labels), ``unlabeled`` (label null: TMKD stage 1),
``dev`` (gold labels, and groups of candidates for MAP/MRR).

    python tests/toy.py DIR --encoder HF_FOLDER    # writes DIR/store and DIR/student.toml
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa

from tmkd.data.store import CORPUS_SCHEMA, Store, TeacherRecord
from tmkd.teachers.config import dumps

WORDS = ("the city river water year state first school war music film team world people north church "
         "album king company american family south island game house").split()
LABEL_NAMES = ["neg", "pos"]
TEACHER_SCALES = {"t1": (3.0, 0.5), "t2": (1.5, 1.0), "t3": (2.0, 2.0)}  # name -> (scale, noise)


def make_rows(n: int, seed: int, id_offset: int = 0, labeled: bool = True, group_size: int = 0):
    """A corpus table of ``n`` rows and the hidden labels (kept even when the table's are null)."""
    rng = np.random.default_rng(seed)
    hidden = rng.integers(0, 2, n)
    a = [" ".join(rng.choice(WORDS, rng.integers(3, 8))) for _ in range(n)]
    b = []
    for y in hidden:
        words = list(rng.choice(WORDS, rng.integers(2, 10)))
        words.insert(int(rng.integers(0, len(words) + 1)), "good" if y else "bad")
        b.append(" ".join(words))
    groups = [f"q{id_offset + i // group_size}" for i in range(n)] if group_size else [None] * n
    table = pa.table(
        {
            "id": pa.array(np.arange(id_offset, id_offset + n), pa.int64()),
            "text_a": a,
            "text_b": b,
            "label": pa.array(hidden if labeled else [None] * n, pa.int32()),
            "group": pa.array(groups, pa.string()),
            "source_id": pa.array([None] * n, pa.string()),
        },
        schema=CORPUS_SCHEMA,
    )
    return table, hidden


def teacher_logits(name: str, hidden: np.ndarray, seed: int) -> np.ndarray:
    scale, noise = TEACHER_SCALES.get(name, (2.0, 1.0))
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    sign = (2 * hidden - 1).astype(np.float32)
    margin = scale * sign + rng.normal(0, noise, len(hidden)).astype(np.float32)
    return np.stack([-margin / 2, margin / 2], axis=1).astype(np.float32)


def teacher_record(name: str, fingerprint: str | None = None) -> TeacherRecord:
    return TeacherRecord(name=name, fingerprint=fingerprint or f"toy:{name}", path=f"toy/{name}",
                         label_names=LABEL_NAMES, dtype="float32", max_length=64)


def add_corpus(store: Store, corpus: str, sizes: list[int], teachers: list[str], *, labeled=True, group_size=0,
               id_offset=0, seed=0, label_names=LABEL_NAMES) -> list:
    """Write and commit a corpus with parts of the given sizes, and each teacher's label parts."""
    parts, hidden_by_part, ids_by_part = [], [], []
    offset = id_offset
    for i, n in enumerate(sizes):
        table, hidden = make_rows(n, seed * 1000 + i, offset, labeled, group_size)
        parts.append(store.write_corpus_part(corpus, i, table))
        hidden_by_part.append(hidden)
        ids_by_part.append(table.column("id").to_numpy())
        offset += n
    store.commit_corpus_parts(corpus, label_names, parts, {"source": "tests/toy.py"},
                              positive_label="pos" if label_names and "pos" in label_names else None)
    for name in teachers:
        rec = store.teacher(name)
        for part, hidden, ids in zip(parts, hidden_by_part, ids_by_part):
            store.write_label_part(rec, part, ids, teacher_logits(name, hidden, part.part))
    return parts


def build_store(root, teachers=("t1", "t2"), train=(64, 40, 24), unlabeled=(96, 64), dev=(48,),
                group_size=4) -> Store:
    store = Store.create(root)
    for t in teachers:
        store.write_teacher(teacher_record(t))
    add_corpus(store, "train", list(train), list(teachers), seed=1, id_offset=0)
    add_corpus(store, "unlabeled", list(unlabeled), list(teachers), labeled=False, seed=2, id_offset=100_000)
    if dev:
        add_corpus(store, "dev", list(dev), [], seed=3, id_offset=200_000, group_size=group_size)
    return store


def config(store, encoder, output, teachers=("t1", "t2"), stages=None, **top) -> dict:
    """A small config dict (the same keys as student.toml)."""
    stage = {"name": "task", "corpora": ["train"], "epochs": 3, "batch_size": 16, "lr": 2e-3,
             "schedule": "constant", "loss": {"soft": "mse", "alpha": 0.5}}
    raw = {
        "store": str(store), "output": str(output), "teachers": list(teachers), "seed": 0,
        "student": {"encoder": str(encoder), "max_length": 32},
        "data": {"num_workers": 0, "shuffle_buffer": 64, "bucket_batches": 2},
        "eval": {"corpus": "dev", "metric": "map", "batch_size": 32},
        "train": {"mixed_precision": "no", "num_threads": 1},  # tiny models gain nothing from 2 threads
        "stages": stages if stages is not None else [stage],
    }
    raw.update(top)
    return raw


def to_toml(raw: dict) -> str:
    """Write a config dict as TOML (tomli-w, through the jobs' shared config module)."""
    return dumps(raw)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir")
    p.add_argument("--encoder", required=True, help="a Hugging Face folder for the student encoder")
    args = p.parse_args()
    d = Path(args.dir)
    build_store(d / "store")
    stages = [
        {"name": "stage1", "corpora": ["unlabeled"], "epochs": 1, "batch_size": 16, "lr": 1e-3, "gold": False,
         "loss": {"soft": "mse"}},
        {"name": "stage2", "corpora": ["train"], "epochs": 2, "batch_size": 16, "lr": 1e-3,
         "loss": {"soft": "kl", "temperature": 2.0, "alpha": 0.5}},
    ]
    (d / "student.toml").write_text(to_toml(config(d / "store", args.encoder, d / "out", stages=stages)))
    print(f"wrote {d / 'store'} and {d / 'student.toml'}")


if __name__ == "__main__":
    main()
