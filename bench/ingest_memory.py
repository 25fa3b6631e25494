"""Ingest in flat memory: the duplicate-id check (data/ingest.py: IdSet) measured alone and inside a whole ingest.

    python bench/ingest_memory.py idset 10000000          # the set alone: lookups and inserts of random ids in
                                                          #   chunks of 8,192; its allocations (tracemalloc peak)
    python bench/ingest_memory.py ingest FILE.jsonl       # one whole ingest of FILE (as the CLI runs it)
    python bench/ingest_memory.py ingest FILE.jsonl --ids memory   # the same with the ids in memory (the set of
                                                          #   commit 15416df: sorted runs in RAM), for a side-by-side
    python bench/ingest_memory.py ingest FILE.jsonl --ids off      # no duplicate check at all (what the rest costs)

Run them side by side with farm-bench (peak RSS and wall time, alternated), e.g.
    farm-bench -n 5 --vs 'python bench/ingest_memory.py ingest /tmp/scale/ingest-1000000.jsonl' -- \\
        python bench/ingest_memory.py ingest /tmp/scale/ingest-10000000.jsonl
(bench/scale.py --ingest-rows N writes those JSONL files of real WikiQA sentences.)
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from tmkd.data import ingest as ing
from tmkd.data.store import Store

ROOT = Path(__file__).resolve().parents[1]


def in_memory_idset():
    """The IdSet of commit 15416df (every id in memory, sorted runs merged like a binary counter)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", "15416df:data/ingest.py"], capture_output=True, text=True,
                         check=True).stdout
    start = src.index("class IdSet:")
    ns = {"np": np}
    exec(src[start:src.index("\n\n\n", start)], ns)
    ns["IdSet"].close = lambda self: None
    return ns["IdSet"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    a = sub.add_parser("idset")
    a.add_argument("n", type=int)
    b = sub.add_parser("ingest")
    b.add_argument("file", type=Path)
    b.add_argument("--ids", choices=("disk", "memory", "off"), default="disk")
    args = ap.parse_args()
    if args.what == "idset":
        rng = np.random.default_rng(0)
        tracemalloc.start()
        ids, looking, adding = ing.IdSet(), 0.0, 0.0
        for i in range(0, args.n, 8192):
            chunk = rng.integers(-2**63, 2**63 - 1, min(8192, args.n - i), dtype=np.int64)
            t = time.perf_counter()
            ids.contains(chunk)
            looking += time.perf_counter() - t
            t = time.perf_counter()
            ids.add(chunk)
            adding += time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
        print(f"{args.n:,} ids: lookups {looking:.1f} s, inserts and merges {adding:.1f} s, runs "
              f"{[n for _, n in ids.runs]}, allocations peak {peak / 2**20:.0f} MB")
        ids.close()
        return
    if args.ids == "memory":
        ing.IdSet = in_memory_idset()
    elif args.ids == "off":
        ing.IdSet.contains = lambda self, ids: np.zeros(len(ids), bool)
        ing.IdSet.add = lambda self, ids: None
    root = Path(tempfile.mkdtemp(prefix="tmkd-bench-ingest-"))
    try:
        t = time.perf_counter()
        s = ing.ingest(Store.create(root / "store"), [args.file], ing.IngestOptions("jsonl", "c", label_names=["0", "1"]))
        print(f"{s.rows_written:,} rows in {time.perf_counter() - t:.1f} s (ids: {args.ids})")
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
