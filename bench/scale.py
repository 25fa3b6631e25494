"""The store at scale: a synthetic store of N pairs × 3 teachers in P parts, and what reading it costs.

The store is built through the store's own writer API (Store.write_corpus_part / write_label_part:
the product's Parquet layout, digests and commit records), with no model forward: texts are
pairs of real sentences drawn from WikiQA (../shared/data), logits random (three teachers that
mostly agree). Then each command is timed as a user runs it, in a fresh process:

    tmkd-label status   --store S
    tmkd-label verify   --store S
    tmkd-label query    --store S "<3-teacher argmax agreement by corpus>"   (over scores; and with joins over labels)

and, with --ingest-rows, `tmkd-label ingest` of a JSONL file of that many rows (rows/s, peak RSS).

    python bench/scale.py --rows 10000000 --parts 1000 --out /tmp/scale     # -> /tmp/scale/scale-10000000-1000.json
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from tmkd.data.store import Store, TeacherRecord

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BIN = Path(sys.executable).parent
TEACHERS = ("t0", "t1", "t2")
AGREEMENT = (  # per corpus: how often all three teachers' argmax agree, and each pair (the wide view: no join)
    "SELECT corpus, count(*) AS pairs, avg((a = b AND b = c)::INT) AS all_three, avg((a = b)::INT) AS t0_t1, "
    "avg((a = c)::INT) AS t0_t2, avg((b = c)::INT) AS t1_t2 FROM (SELECT corpus, predicted(t0) AS a, "
    "predicted(t1) AS b, predicted(t2) AS c FROM scores) GROUP BY corpus ORDER BY corpus"
)
AGREEMENT_JOIN = (  # the same over the long view: a 3-way join
    "SELECT corpus, count(*) AS pairs, avg((a.p = b.p AND b.p = c.p)::INT) AS all_three, "
    "avg((a.p = b.p)::INT) AS t0_t1, avg((a.p = c.p)::INT) AS t0_t2, avg((b.p = c.p)::INT) AS t1_t2 FROM "
    + " JOIN ".join(f"(SELECT corpus, part, \"row\", list_position(logits, list_max(logits)) AS p FROM labels "
                    f"WHERE teacher = '{t}') {x}" + (" USING (corpus, part, \"row\")" if x != "a" else "")
                    for t, x in zip(TEACHERS, "abc"))
    + " GROUP BY corpus ORDER BY corpus"
)


def sentences() -> np.ndarray:
    """Real questions and answer sentences from WikiQA train (~30,000 distinct strings)."""
    out = set()
    with gzip.open(SHARED / "wikiqa" / "WikiQA-train.tsv.gz", "rt", encoding="utf-8") as f:
        next(f)
        for line in f:
            cols = line.rstrip("\r\n").split("\t")
            out.update((cols[1], cols[5]))
    return np.array(sorted(out), dtype=object)


def build(root: Path, rows: int, parts: int, texts: np.ndarray, seed: int = 0) -> Store:
    shutil.rmtree(root, ignore_errors=True)
    store = Store.create(root)
    rng = np.random.default_rng(seed)
    recs = [TeacherRecord(t, f"sha256:{t}", "synthetic", ["0", "1"], "float32", 128) for t in TEACHERS]
    for r in recs:
        store.write_teacher(r)
    written = []
    bounds = np.linspace(0, rows, parts + 1).astype(np.int64)
    for p in range(parts):
        n = int(bounds[p + 1] - bounds[p])
        ids = np.arange(bounds[p], bounds[p + 1], dtype=np.int64)
        table = pa.table({"id": ids, "text_a": pa.array(texts[rng.integers(0, len(texts), n)], pa.string()),
                          "text_b": pa.array(texts[rng.integers(0, len(texts), n)], pa.string()),
                          "label": pa.array(rng.integers(0, 2, n), pa.int32()),
                          "group": pa.nulls(n, pa.string()), "source_id": pa.nulls(n, pa.string())})
        part = store.write_corpus_part("synthetic", p, table)
        written.append(part)
        base = rng.normal(size=(n, 2)).astype(np.float32)
        for r in recs:
            store.write_label_part(r, part, ids, base + 0.5 * rng.normal(size=(n, 2)).astype(np.float32))
    store.commit_corpus_parts("synthetic", ["0", "1"], written, {"file": "synthetic"})
    return store


def timed(cmd: list[str]) -> dict:
    """Wall seconds and peak RSS (GNU time's %M) of one command, as a user runs it."""
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *map(str, cmd)], capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    peak_kb = int(proc.stderr.strip().splitlines()[-1])
    return {"seconds": round(seconds, 2), "peak_rss_mb": round(peak_kb / 1024, 1),
            "output_tail": (proc.stdout + proc.stderr).strip().splitlines()[-4:-1]}


def write_jsonl(path: Path, rows: int, texts: np.ndarray, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, rows, 100_000):
            n = min(100_000, rows - start)
            a, b = texts[rng.integers(0, len(texts), n)], texts[rng.integers(0, len(texts), n)]
            labels = rng.integers(0, 2, n)
            f.write("".join(json.dumps({"id": start + i, "text_a": a[i], "text_b": b[i], "label": int(labels[i])})
                            + "\n" for i in range(n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--parts", type=int, default=1000)
    ap.add_argument("--ingest-rows", type=int, default=0, help="also time ingest of a JSONL file of this many rows")
    ap.add_argument("--out", type=Path, default=Path("/tmp/scale"))
    ap.add_argument("--keep", action="store_true", help="keep the store (default: removed at the end)")
    ap.add_argument("--reuse", action="store_true", help="time a store kept by an earlier --keep run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    texts = sentences()
    result = {"rows": args.rows, "parts": args.parts, "teachers": len(TEACHERS)}
    store_dir = args.out / f"store-{args.rows}-{args.parts}"
    t = time.perf_counter()
    if args.reuse and (store_dir / "store.json").exists():
        store = Store(store_dir)  # built by an earlier --keep run with the same --rows and --parts
        assert store.corpus("synthetic").rows == args.rows and len(store.corpus("synthetic").parts) == args.parts
    else:
        build(store_dir, args.rows, args.parts, texts)
    result["build_seconds"] = round(time.perf_counter() - t, 1)
    result["store_mb"] = round(sum(f.stat().st_size for f in store_dir.rglob("*") if f.is_file()) / 2**20, 1)
    print(f"built {args.rows:,} rows x 3 teachers in {args.parts} parts: {result['build_seconds']} s, "
          f"{result['store_mb']} MB", flush=True)
    label = BIN / "tmkd-label"
    for name, cmd in (("status", [label, "status", "--store", store_dir]),
                      ("verify", [label, "verify", "--store", store_dir]),
                      ("agreement_query", [label, "query", "--store", store_dir, "--format", "csv", AGREEMENT]),
                      ("agreement_join_query", [label, "query", "--store", store_dir, "--format", "csv",
                                                AGREEMENT_JOIN])):
        result[name] = timed(cmd)
        print(f"{name}: {result[name]['seconds']} s, peak RSS {result[name]['peak_rss_mb']} MB", flush=True)
    if args.ingest_rows:
        src = args.out / f"ingest-{args.ingest_rows}.jsonl"
        if not src.exists():
            write_jsonl(src, args.ingest_rows, texts)
        target = args.out / f"ingest-store-{args.ingest_rows}"
        shutil.rmtree(target, ignore_errors=True)
        result["ingest"] = timed([label, "ingest", src, "--format", "jsonl", "--store", target, "--corpus", "c",
                                  "--label-names", "0,1"])
        result["ingest"]["rows_per_s"] = round(args.ingest_rows / result["ingest"]["seconds"])
        print(f"ingest {args.ingest_rows:,} rows: {result['ingest']['seconds']} s "
              f"({result['ingest']['rows_per_s']:,} rows/s), peak RSS {result['ingest']['peak_rss_mb']} MB", flush=True)
        shutil.rmtree(target, ignore_errors=True)
    out = args.out / f"scale-{args.rows}-{args.parts}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if not args.keep:
        shutil.rmtree(store_dir)


if __name__ == "__main__":
    main()
