"""Score QNLI's official dev set for every teacher, the teacher ensemble and every student; one table.

Also bench/mnli.sh's evaluation (``--corpus mnli-test --dev-corpus mnli-select``): any classification task whose
reported and selection sets are corpora of the store.

- Accuracy (argmax) over the 5,463 pairs of the official GLUE QNLI dev set (corpus qnli-dev), which nothing
  in bench/qnli.sh uses to choose anything: the teachers' epochs and the students' checkpoints are chosen on
  qnli-heldout (1,000 more pairs of the official *train* set).
- Teachers' logits come from the label store (scored once by `tmkd-label run`); the ensemble is the mean of
  the teachers' logits. Students are scored here from their exported folders.
- Speed: pairs/s of one teacher, the ensemble and each student on the same pairs, measured in this run, one
  after another (bench/wikiqa_eval.py's scorer).
- ``--runs-out``: every run as one object {"variant", "seed", "dev_map", "test_map", "test_mrr",
  "test_accuracy", "dev_accuracy"}, bench/seeds_table.py's input. The MAP fields are null (QNLI is pair
  classification); "dev_accuracy" is the selection accuracy on qnli-heldout: the one that chose a student's
  exported checkpoint (run.json "best"), and for the teachers and the ensemble, computed from the stored logits.

    python bench/qnli_eval.py --store runs/qnli/store --teachers A B C --students tmkd@1=runs/qnli/students/tmkd-seed1 \\
        --out runs/qnli/results.json --runs-out runs/qnli/qnli-seeds.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from wikiqa_eval import read_scored, score_students

from tmkd.data.store import Store
from tmkd.teachers.device import computed_dtype, describe


def accuracy(logits: np.ndarray, gold: np.ndarray) -> float:
    return float((logits.argmax(1) == gold).mean())


def check_label_order(folder: str, label_names: list[str]) -> None:
    """A student's exported head must list the corpus's labels in the corpus's order, or argmax compares wrong."""
    config = json.loads((Path(folder) / "config.json").read_text())
    names = [config["id2label"][str(i)] for i in range(len(config["id2label"]))]
    if names != label_names:
        raise SystemExit(f"{folder}: labels {names} are not the corpus's {label_names}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--corpus", default="qnli-dev", help="the reported set (QNLI: the official dev set)")
    ap.add_argument("--dev-corpus", default="qnli-heldout", help="the selection set")
    ap.add_argument("--teachers", nargs="+", required=True, help="teacher names in the store")
    ap.add_argument("--students", nargs="*", default=[], help="VARIANT@SEED=FOLDER of exported students")
    ap.add_argument("--dtype", default="bfloat16", help="scoring dtype for the speed figures")
    ap.add_argument("--out", type=Path, required=True, help="results JSON")
    ap.add_argument("--runs-out", type=Path, help="one object per run (variant, seed, metrics)")
    args = ap.parse_args()

    store = Store(args.store)
    records = [store.teacher(t) for t in args.teachers]
    label_names = store.corpus(args.corpus).label_names
    cols, teacher_logits = read_scored(store, args.corpus, records, ["text_a", "text_b", "label"])
    gold = np.asarray(cols["label"])
    dev_cols, dev_logits = read_scored(store, args.dev_corpus, records, ["label"])
    dev_gold = np.asarray(dev_cols["label"])

    rows = {rec.name: {"kind": "teacher", "accuracy": accuracy(teacher_logits[:, i], gold),
                       "dev_accuracy": accuracy(dev_logits[:, i], dev_gold)} for i, rec in enumerate(records)}
    rows["teacher-ensemble"] = {"kind": "ensemble", "accuracy": accuracy(teacher_logits.mean(1), gold),
                                "dev_accuracy": accuracy(dev_logits.mean(1), dev_gold)}
    folders = dict(s.split("=", 1) for s in args.students)
    for folder in folders.values():
        check_label_order(folder, label_names)
    student_logits, speed = score_students(records, args.students, cols["text_a"], cols["text_b"], args.dtype)
    for name, lg in student_logits.items():
        best = json.loads((Path(folders[name]) / "run.json").read_text())["best"]
        rows[name] = {"kind": "student", "accuracy": accuracy(lg, gold),
                      "dev_accuracy": best["value"] if best and best["metric"] == "accuracy" else None}
    for name, r in rows.items():
        r["pairs_per_s"] = speed[name]
    dtype = computed_dtype(args.dtype, describe(torch.device("cpu")))  # what the speed figures were measured in
    args.out.write_text(json.dumps({"corpus": args.corpus, "pairs": len(gold), "dtype": dtype, "rows": rows},
                                   indent=2))
    if args.runs_out:
        runs = []
        for name, r in rows.items():
            variant, _, seed = name.partition("@")
            runs.append({"variant": variant, "seed": int(seed) if seed else None, "dev_map": None, "test_map": None,
                         "test_mrr": None, "test_accuracy": r["accuracy"], "dev_accuracy": r["dev_accuracy"]})
        args.runs_out.write_text(json.dumps(runs, indent=1) + "\n")

    print(f"| model | kind | {args.dev_corpus} accuracy (selection) | {args.corpus} accuracy (reported) "
          f"| pairs/s ({dtype}) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        sel = "–" if r["dev_accuracy"] is None else f"{r['dev_accuracy']:.4f}"
        print(f"| {name} | {r['kind']} | {sel} | {r['accuracy']:.4f} | {r['pairs_per_s']:.0f} |")
    print(f"\n{len(gold):,} pairs of {args.corpus}; results: {args.out}")


if __name__ == "__main__":
    main()
