"""Resident memory of teacher fine-tuning over epochs and teachers (goal: < 2 GB, flat: <= +10% from the
first teacher's first epoch to the last teacher's last, epoch end against epoch end).

Runs `teachers/finetune.py` (bench/wikiqa.sh's three WikiQA teachers, in one process, as the bench runs them)
as a child process, samples its RSS from /proc every 0.2 s, and notes the RSS at each epoch's end and each
teacher's end (from the lines the job prints). ``--env KEY=VALUE`` sets the child's environment, e.g.
``ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 MALLOC_ARENA_MAX=16`` for oneDNN's and glibc's defaults (what the job
ran with before it bounded them: teachers/cpu.py), or ``MALLOC_MMAP_THRESHOLD_=131072`` to keep glibc's mmap
threshold from growing (BENCHMARKS.md, section 10: less memory, much slower). ``--set`` passes through, e.g.
``--set max_train_rows=6000`` for a shorter run. Each epoch's seconds (training and its dev pass, from the job's
epoch line) are recorded too, so two settings run side by side also give their speed ratio.

    python bench/finetune_memory.py --store runs/wikiqa/store --out runs/bench-ft-memory
    python bench/finetune_memory.py --store runs/wikiqa/store --out runs/bench-ft-memory-defaults \\
        --env ONEDNN_PRIMITIVE_CACHE_CAPACITY=1024 --env MALLOC_ARENA_MAX=16
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EPOCH_END = re.compile(r"^\s*(\S+) epoch (\d+): loss.*\s(\d+)s\s*$")
TEACHER_END = re.compile(r"^\[(\S+)\] best epoch")


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "teachers/configs/wikiqa-minilm.toml"))
    ap.add_argument("--store", required=True)
    ap.add_argument("--out", type=Path, required=True, help="where the teachers and memory.json go")
    ap.add_argument("--set", action="append", default=[], help="passed to finetune.py")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the child's environment")
    args = ap.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **dict(e.split("=", 1) for e in args.env)}
    cmd = [sys.executable, str(ROOT / "teachers/finetune.py"), "--config", args.config, "--store", args.store,
           "--out", str(args.out / "teachers"), *[x for s in args.set for x in ("--set", s)]]
    start = time.perf_counter()
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples: list[tuple[float, float]] = []

    def sample() -> None:
        while child.poll() is None:
            r = rss_mb(child.pid)
            if r is not None:
                samples.append((time.perf_counter() - start, r))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    marks = []
    for line in child.stdout:
        print(line, end="", flush=True)
        m, t = EPOCH_END.match(line), TEACHER_END.match(line)
        if m or t:
            marks.append({"at": "epoch end" if m else "teacher end", "teacher": (m or t).group(1),
                          "epoch": int(m.group(2)) if m else None, "seconds": round(time.perf_counter() - start, 1),
                          "epoch_seconds": int(m.group(3)) if m else None,
                          "rss_mb": round(rss_mb(child.pid) or 0.0)})
    child.wait()
    sampler.join()
    if child.returncode:
        raise SystemExit(f"finetune.py exited with {child.returncode}")
    epochs = [m for m in marks if m["at"] == "epoch end"]
    ends = [m for m in marks if m["at"] == "teacher end"]
    first, last = epochs[0], epochs[-1]
    peak = max(r for _, r in samples)
    # like with like: epoch end against epoch end (during training), teacher end against teacher end (after the
    # teacher is saved and its memory handed back)
    result = {"command": cmd, "env": args.env, "marks": marks, "peak_rss_mb": round(peak),
              "first_epoch_rss_mb": first["rss_mb"], "last_epoch_rss_mb": last["rss_mb"],
              "growth": round(last["rss_mb"] / first["rss_mb"], 3),
              "teacher_end_growth": round(ends[-1]["rss_mb"] / ends[0]["rss_mb"], 3),
              # the wording: the first teacher's first epoch against the last teacher's end
              "first_epoch_to_last_teacher_end": round(ends[-1]["rss_mb"] / first["rss_mb"], 3),
              "epoch_seconds": sum(m["epoch_seconds"] for m in epochs),
              "seconds": round(time.perf_counter() - start),
              "samples": [(round(t, 1), round(r)) for t, r in samples[::5]]}
    (args.out / "memory.json").write_text(json.dumps(result, indent=1) + "\n")
    print("\n| teacher | at | RSS MB | s |\n|---|---|---|---|")
    for m in marks:
        print(f"| {m['teacher']} | {m['at']}{'' if m['epoch'] is None else ' ' + str(m['epoch'])} | "
              f"{m['rss_mb']:,} | {m['seconds']:.0f} |")
    print(f"\npeak RSS {peak:,.0f} MB; first epoch's end -> last epoch's end: {first['rss_mb']:,} -> "
          f"{last['rss_mb']:,} MB ({result['growth']:.2f}x); first teacher's end -> last's: {ends[0]['rss_mb']:,} -> "
          f"{ends[-1]['rss_mb']:,} MB ({result['teacher_end_growth']:.2f}x); first epoch's end -> last teacher's end "
          f"{result['first_epoch_to_last_teacher_end']:.2f}x; epochs {result['epoch_seconds']} s; {result['seconds']} s; "
          f"{args.out / 'memory.json'}")


if __name__ == "__main__":
    main()
