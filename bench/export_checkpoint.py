"""Export a training checkpoint (OUT/checkpoints/step-N: the multi-head student) as a stock model folder.

    python bench/export_checkpoint.py RUN_FOLDER CHECKPOINT OUT

The trainer exports only the best epoch by dev. A stage-2 run started from another run's stage-1
checkpoint (``student.init``) never evaluates that checkpoint, so when the stage-1 weights have the
better dev score, the full recipe would have exported them: this makes that export, the same way
(heads folded into one, tokenizer beside it). RUN_FOLDER is the run that wrote the checkpoint (its
run.json gives the encoder, its cut, the heads and the labels). OUT/run.json records where the export
came from and, as "best", the dev score the trainer measured at that step (its metrics.jsonl line).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from tmkd.student.model import export, load_student
    from tmkd.student.train import init_weights

    record = json.loads((args.run / "run.json").read_text())
    cfg = record["config"]
    labels = (record["teachers"][0]["label_names"] if record["teachers"]  # no-KD: its corpora's
              else next(c["label_names"] for c in record["corpora"].values() if c["label_names"]))
    heads = 1 if (cfg["soft_target"] == "ensemble" or not record["teachers"]) else len(record["teachers"])
    student = load_student(cfg["student"]["encoder"], len(labels), heads, cfg["student"]["num_layers"], labels,
                           cfg["student"].get("layers") or None)
    init_weights(student, args.checkpoint)
    export(student.eval(), AutoTokenizer.from_pretrained(cfg["student"]["tokenizer"] or cfg["student"]["encoder"]),
           args.out)
    step = int(args.checkpoint.name.rsplit("-", 1)[-1])
    lines = [json.loads(x) for x in (args.run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    at = [x for x in lines if x["step"] == step]
    metric = cfg["eval"]["metric"]
    best = ({"metric": metric, "value": at[0][f"eval_{metric}"], "stage": at[0]["stage"], "epoch": at[0]["epoch"],
             "step": step} if at and f"eval_{metric}" in at[0] else None)
    (args.out / "run.json").write_text(json.dumps({"status": "done", "exported_from": str(args.checkpoint),
                                                   "run": str(args.run), "best": best}, indent=2) + "\n")
    print(f"exported {args.checkpoint} ({heads} heads folded; dev {metric} {best and best['value']}) -> {args.out}")


if __name__ == "__main__":
    main()
