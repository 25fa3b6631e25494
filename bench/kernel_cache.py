"""bf16 labeler speed and memory against a kernel cache's capacity (one process per setting).

`tmkd-label run` bounds oneDNN's kernel cache to keep memory flat as the corpus grows (teachers/cpu.py);
the bound has a speed cost in bf16, where kernels are built per batch shape. This scores WikiQA test
(6,165 pairs, one all-MiniLM-L6-v2-shaped teacher, bf16) three times per process, for each capacity,
alternating the settings ``--rounds`` times, and prints pairs/s per pass and the process's peak RSS.

    python bench/kernel_cache.py --teacher runs/bench7/teacher --store runs/bench7/store-bfloat16

``--variable LRU_CACHE_CAPACITY`` sweeps PyTorch's ideep cache instead of oneDNN's (the other stays at
bound_cpu_caches()'s 8); ``--corpus`` picks the store's corpus (default: its first), whose first part is scored.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import resource, sys, time
from tmkd.teachers.cpu import bound_cpu_caches
bound_cpu_caches()
import torch
from pathlib import Path
from tmkd.data.store import Store
from tmkd.teachers.spec import TeacherSpec
from tmkd.teachers.scoring import LoadedTeacher, encode_pairs, load_tokenizer
folder, st = Path({teacher!r}), Store({store!r})
part = st.corpus({corpus!r} or st.corpora()[0]).parts[0]
t = st.read_corpus_part(part, ["text_a", "text_b"])
tok = load_tokenizer(folder)
spec = TeacherSpec(name="x", path=str(folder), max_length=128, dtype="bfloat16")
lt = LoadedTeacher(spec, None, folder, torch.device("cpu"), tok)
enc = encode_pairs(tok, t.column("text_a").to_pylist(), t.column("text_b").to_pylist(), 128, "longest_first")
rates = []
for _ in range(3):
    t0 = time.perf_counter(); lt.score(enc); rates.append(len(enc) / (time.perf_counter() - t0))
print([round(r) for r in rates], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=str(ROOT / "runs" / "bench7" / "teacher"))
    ap.add_argument("--store", default=str(ROOT / "runs" / "bench7" / "store-bfloat16"))
    ap.add_argument("--capacities", default="8,64,256,1024")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variable", default="ONEDNN_PRIMITIVE_CACHE_CAPACITY",
                    choices=["ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"])
    ap.add_argument("--corpus", default=None)
    args = ap.parse_args()
    code = CHILD.format(root=str(ROOT), teacher=args.teacher, store=args.store, corpus=args.corpus)
    for r in range(args.rounds):
        for cap in args.capacities.split(","):
            env = {**os.environ, args.variable: cap}
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            print(f"round {r} {args.variable} {cap}: pairs/s per pass, peak RSS MB: {out.stdout.strip()}", flush=True)


if __name__ == "__main__":
    main()
