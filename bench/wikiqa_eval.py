"""Score WikiQA test for every teacher, the teacher ensemble and every student; one table.

- MAP and MRR over the official filtered questions (`WikiQA-test-filtered.ref`: the 237
  questions with at least one correct and one wrong candidate), with the relevance taken from
  the .ref file (TREC format: question number, 0, candidate number, relevance; numbers follow
  the order of the test TSV, which ingest keeps). Candidates rank by the log-odds of label 1.
- Pair accuracy over all 6,165 test pairs (argmax; the majority rate is 0.952).
- Teachers' logits come from the label store (scored once by `tmkd-label run`); the ensemble
  is the mean of the teachers' logits. Students are scored here from their exported folders.
- Speed: pairs/s of one teacher, the ensemble (every teacher) and each student, scoring the
  test pairs with the same length-batched bf16 scorer, measured in this run, one after another.
- ``--runs-out``: every run as one object {"variant", "seed", "dev_map", "test_map", "test_mrr",
  "test_accuracy"} (bench/seeds_table.py's input). A student named ``VARIANT@SEED`` is one seed of a
  variant; its dev MAP is the one that chose its exported checkpoint (run.json "best"). The teachers
  and the ensemble have no student seed (null); their dev MAP is computed here from the stored dev
  logits, over the dev corpus's groups, as the trainer computes a student's.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from tmkd.data.store import Store
from tmkd.teachers.device import computed_dtype, describe
from tmkd.teachers.metrics import map_mrr
from tmkd.teachers.scoring import score_folder


def read_ref(path: Path) -> dict[tuple[int, int], int]:
    ref = {}
    for line in path.read_text().split("\n"):
        if line.strip():
            q, _, s, rel = line.split()
            ref[(int(q), int(s))] = int(rel)
    return ref


def ref_positions(source_ids: list[str]) -> list[tuple[int, int]]:
    """(question number, candidate number) of each row, as the .ref files count them."""
    qnum: dict[str, int] = {}
    seen: dict[str, int] = {}
    out = []
    for sid in source_ids:
        q = sid.split("/")[0]
        if q not in qnum:
            qnum[q], seen[q] = len(qnum) + 1, 0
        out.append((qnum[q], seen[q]))
        seen[q] += 1
    return out


def ranking_metrics(score: np.ndarray, positions, ref) -> dict:
    """MAP / MRR over the questions of the .ref file, by tmkd.teachers.metrics.map_mrr.

    Only rows whose (question, candidate) is in ``ref`` take part (others get no group), with
    the .ref relevance (non-zero = correct); questions are grouped by their .ref number, and a
    question counts only with at least one correct and one wrong candidate (all of them, in the
    filtered .ref). Ties in score keep the test TSV's order (map_mrr's stable sort).
    """
    groups = [pos[0] if pos in ref else None for pos in positions]
    relevant = np.array([ref.get(pos, 0) != 0 for pos in positions], dtype=bool)
    m = map_mrr(score, relevant, groups)
    return {"map": m["map"], "mrr": m["mrr"], "questions": m["groups_counted"]}


def metrics(logits: np.ndarray, gold: np.ndarray, positions, ref) -> dict:
    return {**ranking_metrics(logits[:, 1] - logits[:, 0], positions, ref),
            "accuracy": float((logits.argmax(1) == gold).mean())}


def read_scored(store: Store, corpus: str, records, columns: list[str]) -> tuple[dict[str, list], np.ndarray]:
    """The corpus's ``columns`` (as lists, in store order) and every teacher's stored logits [rows, teachers, labels],
    each part checked and aligned by the store."""
    tables, logits = [], []
    for part in store.corpus(corpus).parts:
        table, lg = store.read_aligned(part, records, columns)
        tables.append(table)
        logits.append(lg)
    return {c: [x for t in tables for x in t.column(c).to_pylist()] for c in columns}, np.concatenate(logits)


def score_students(records, students: list[str], a: list[str], b: list[str], dtype: str
                   ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Each ``NAME=FOLDER`` student's logits on the pairs, and the pairs/s of every teacher, of the ensemble (every
    teacher, one after another) and of every student: measured here and now, one model after another, with the same
    length-batched scorer at ``dtype``."""
    seconds = {}
    for rec in records:
        _, pps = score_folder(Path(rec.path), a, b, rec.max_length, dtype)
        seconds[rec.name] = len(a) / pps
    speed = {name: len(a) / s for name, s in seconds.items()}
    speed["teacher-ensemble"] = len(a) / sum(seconds.values())
    logits = {}
    for spec in students:
        name, folder = spec.split("=", 1)
        logits[name], speed[name] = score_folder(Path(folder), a, b, records[0].max_length, dtype)
    return logits, speed


def dev_maps(store: Store, records, corpus: str) -> dict[str, float]:
    """Dev MAP of each teacher and of their mean, from the stored logits, ranked by log-odds of label 1
    over the corpus's groups (a group counts with a correct and a wrong candidate), as the trainer
    ranks a student's dev set."""
    cols, lg = read_scored(store, corpus, records, ["label", "group"])
    gold, groups = np.asarray(cols["label"]), cols["group"]
    out = {rec.name: map_mrr(lg[:, i, 1] - lg[:, i, 0], gold == 1, groups)["map"] for i, rec in enumerate(records)}
    mean = lg.mean(1)
    out["teacher-ensemble"] = map_mrr(mean[:, 1] - mean[:, 0], gold == 1, groups)["map"]
    return out


def run_record(name: str, row: dict, dev: dict[str, float], folders: dict[str, str]) -> dict:
    """One run for bench/seeds_table.py: ``VARIANT@SEED`` students carry their seed and their own dev MAP."""
    if row["kind"] == "student":
        variant, _, seed = name.partition("@")
        variant = {"ensemble": "ensemble-label"}.get(variant, variant)  # bench/configs/wikiqa-ensemble.toml
        best = json.loads((Path(folders[name]) / "run.json").read_text())["best"]
        dev_map = best["value"] if best and best["metric"] == "map" else None
        seed = int(seed) if seed else None
    else:
        variant, seed, dev_map = name, None, dev[name]
    return {"variant": variant, "seed": seed, "dev_map": dev_map, "test_map": row["map"], "test_mrr": row["mrr"],
            "test_accuracy": row["accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--corpus", default="wikiqa-test")
    ap.add_argument("--ref", type=Path, required=True, help="WikiQA-test-filtered.ref")
    ap.add_argument("--teachers", nargs="+", required=True, help="teacher names in the store")
    ap.add_argument("--students", nargs="*", default=[], help="NAME=FOLDER of exported students")
    ap.add_argument("--dtype", default="bfloat16", help="scoring dtype for the speed figures")
    ap.add_argument("--out", type=Path, required=True, help="results JSON")
    ap.add_argument("--dev-corpus", default="wikiqa-dev", help="for the teachers' dev MAP in --runs-out")
    ap.add_argument("--runs-out", type=Path, help="one object per run (variant, seed, dev and test metrics)")
    args = ap.parse_args()

    store = Store(args.store)
    records = [store.teacher(t) for t in args.teachers]
    cols, teacher_logits = read_scored(store, args.corpus, records, ["text_a", "text_b", "label", "source_id"])
    a, b, gold = cols["text_a"], cols["text_b"], np.asarray(cols["label"])
    positions = ref_positions(cols["source_id"])
    ref = read_ref(args.ref)
    mismatch = sum(ref[p] != g for p, g in zip(positions, gold) if p in ref)
    if mismatch or sum(p in ref for p in positions) != len(ref):
        raise SystemExit(f"{args.ref} does not match corpus {args.corpus!r} ({mismatch} relevance mismatches)")

    rows = {}
    for i, rec in enumerate(records):
        rows[rec.name] = {"kind": "teacher", **metrics(teacher_logits[:, i], gold, positions, ref)}
    rows["teacher-ensemble"] = {"kind": "ensemble", **metrics(teacher_logits.mean(1), gold, positions, ref)}

    student_logits, speed = score_students(records, args.students, a, b, args.dtype)
    for name, lg in student_logits.items():
        rows[name] = {"kind": "student", **metrics(lg, gold, positions, ref)}
    for name, r in rows.items():
        r["pairs_per_s"] = speed[name]
    dtype = computed_dtype(args.dtype, describe(torch.device("cpu")))  # what the speed figures were measured in
    args.out.write_text(json.dumps({"corpus": args.corpus, "pairs": len(a), "dtype": dtype, "rows": rows}, indent=2))
    if args.runs_out:
        dev = dev_maps(store, records, args.dev_corpus)
        runs = [run_record(name, r, dev, dict(s.split("=", 1) for s in args.students)) for name, r in rows.items()]
        args.runs_out.write_text(json.dumps(runs, indent=1) + "\n")

    print(f"| model | kind | test MAP | test MRR | pair accuracy | pairs/s ({dtype}) |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['kind']} | {r['map']:.4f} | {r['mrr']:.4f} | {r['accuracy']:.4f} | {r['pairs_per_s']:.0f} |")
    print(f"\n{rows[records[0].name]['questions']} questions counted; {len(a):,} pairs; results: {args.out}")


if __name__ == "__main__":
    main()
