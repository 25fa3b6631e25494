"""Build the stage-1 unlabeled Q&A corpus for the WikiQA comparison, from real text.

TMKD's stage 1 distils the teachers on a large *unlabeled* corpus of question/passage pairs.
WikiQA has no such corpus, so we make one from real questions and sentences (labels dropped):

1. the WikiQA train pairs (20,360): the task's own distribution;
2. WikiQA train questions re-paired with sentences from other questions' candidate lists
   (5 per question, seeded): off-topic candidates the teachers should score low;
3. the QNLI pairs in shared/data/qnli (train samples and the official dev set: 15,463
   question/Wikipedia-sentence pairs from SQuAD): other questions, other writers.

Nothing from WikiQA dev or test goes in. ``--pools DIR`` writes instead the same sources' questions and
sentences, unpaired (DIR/questions.txt, DIR/passages.txt), for ``tmkd-label mine`` to pair by BM25. The output is JSONL (question, sentence, source) for
`tmkd-label ingest --format jsonl --unlabeled`; it stays outside the repository (WikiQA's
licence is research-only).
"""
from __future__ import annotations

import argparse
import csv
import gzip
import json
import random
from pathlib import Path


def wikiqa_rows(path: Path):
    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader)
        for row in reader:
            yield dict(zip(header, row))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="shared/data folder")
    ap.add_argument("--out", type=Path, required=True, help="output JSONL file")
    ap.add_argument("--repairs-per-question", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pools", action="store_true", help="--out is a folder: write questions.txt and passages.txt")
    args = ap.parse_args()
    rng = random.Random(args.seed)

    train = list(wikiqa_rows(args.data / "wikiqa" / "WikiQA-train.tsv.gz"))
    questions: dict[str, str] = {}
    sentences_of: dict[str, list[str]] = {}
    for r in train:
        questions[r["QuestionID"]] = r["Question"]
        sentences_of.setdefault(r["QuestionID"], []).append(r["Sentence"])
    qids = list(questions)

    out = []
    out += [{"question": r["Question"], "sentence": r["Sentence"], "source": "wikiqa-train"} for r in train]
    for qid in qids:
        for _ in range(args.repairs_per_question):
            other = rng.choice(qids)
            while other == qid:
                other = rng.choice(qids)
            out.append({"question": questions[qid], "sentence": rng.choice(sentences_of[other]), "source": "wikiqa-repaired"})
    for name in ("train-sample.json", "heldout-sample.json"):
        for rec in json.loads((args.data / "qnli" / name).read_text()).values():
            out.append({"question": rec["text_a"], "sentence": rec["text_b"], "source": "qnli-train"})
    with open(args.data / "qnli" / "dev.tsv", encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        out += [{"question": r[1], "sentence": r[2], "source": "qnli-dev"} for r in reader]

    if args.pools:  # one text per line: tabs and newlines inside a text become spaces
        args.out.mkdir(parents=True, exist_ok=True)
        for name, key in (("questions.txt", "question"), ("passages.txt", "sentence")):
            texts = dict.fromkeys(" ".join(r[key].split()) for r in out if r["source"] != "wikiqa-repaired")
            (args.out / name).write_text("\n".join(texts) + "\n", encoding="utf-8")
            print(f"wrote {len(texts):,} distinct {key}s to {args.out / name}")
        return
    rng.shuffle(out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        for rec in out:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    counts = {}
    for rec in out:
        counts[rec["source"]] = counts.get(rec["source"], 0) + 1
    print(f"wrote {len(out):,} unlabeled pairs to {args.out}: {counts}")


if __name__ == "__main__":
    main()
