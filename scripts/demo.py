"""The demo: the label stage on a small real sample (QNLI, CC BY-SA; see data/samples/qnli/README.md).

Each step prints the command a user would type, then runs it. Re-running reuses what is
done: corpora already ingested are kept, and `tmkd-label run` scores nothing twice.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "samples" / "qnli"
BIN = Path(sys.executable).parent


def sh(*cmd) -> None:
    cmd = [str(c) for c in cmd]
    print(f"\n$ {shlex.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


def build_tiny_teachers(out: Path) -> Path:
    """Three small randomly initialised BERT teachers with a tokenizer trained on the sample.

    Stand-ins until the teacher fine-tuning step exists: they exercise the whole label stage.
    """
    sys.path.insert(0, str(ROOT / "tests"))
    import json

    from tiny import build_bert, build_tokenizer

    toml = out / "teachers.toml"
    if toml.exists():
        return toml
    texts = [v for line in (SAMPLE / "train.jsonl").open() for k, v in json.loads(line).items() if k in ("question", "sentence")]
    tok = build_tokenizer(texts, out / "tokenizer", vocab_size=2000)
    lines = []
    for seed in (1, 2, 3):
        build_bert(out / f"teacher-{seed}", tok, seed=seed, layers=2, hidden=64,
                   label_names=["entailment", "not_entailment"])
        lines += ["[[teacher]]", f'name = "teacher-{seed}"', f'path = "teacher-{seed}"', "max_length = 128",
                  'dtype = "bfloat16"', ""]
    toml.write_text("\n".join(lines))
    return toml


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ROOT / "demo-out", help="where the store and models go")
    args = ap.parse_args()
    start = time.time()
    store = args.out / "store"
    label = BIN / "tmkd-label"

    from pipeline.store import Store

    corpora = Store(store).corpora() if (store / "store.json").exists() else []
    for corpus, file, extra in [
        ("qnli-train", "train.jsonl", []),
        ("qnli-dev", "dev.jsonl", []),
        ("qnli-unlabeled", "unlabeled.jsonl", ["--unlabeled"]),
    ]:
        if corpus not in corpora:
            sh(label, "ingest", SAMPLE / file, "--format", "jsonl", "--store", store, "--corpus", corpus,
               "--columns", "text_a=question,text_b=sentence,label=label,id=id",
               "--label-names", "entailment,not_entailment", "--part-rows", 1000, *extra)
    teachers = build_tiny_teachers(args.out / "teachers")
    sh(label, "run", "--store", store, "--teachers", teachers)
    sh(label, "status", "--store", store)
    sh(label, "query", "--store", store,
       "SELECT a.teacher, b.teacher AS other, round(avg(((a.logits[1] > a.logits[2]) = (b.logits[1] > b.logits[2]))::INT), 3) "
       "AS agreement FROM labels a JOIN labels b USING (corpus, id) WHERE a.teacher < b.teacher GROUP BY ALL ORDER BY ALL")
    sh(label, "verify", "--store", store)
    print(f"\ndemo done in {time.time() - start:.0f} s; store: {store}")


if __name__ == "__main__":
    main()
