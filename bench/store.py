"""Label-store benchmarks: bytes per example per teacher, and DuckDB query times at scale.

Builds a synthetic store through the real store code (Store.write_corpus_part /
write_label_part, so the Parquet layout and encodings are the product's own): N examples in
parts of 50,000 rows, 3 teachers, for 2 and 3 classes and float32 / float16 logits. Then times
inspection queries through `tmkd-label query`'s own views (pipeline.query.connect):
coverage, teacher agreement and mean prediction entropy.

    python bench/store.py --rows 10000000 --out runs/bench-store     # writes runs/bench-store/store.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from tmkd.pipeline.query import connect
from tmkd.data.store import Store, TeacherRecord

PART_ROWS = 50_000
QUERIES = {
    "coverage": "SELECT teacher, corpus, count(DISTINCT part) AS parts, count(*) AS pairs FROM labels GROUP BY ALL",
    "agreement (one pair)": "PAIR:t0,t1",
    "agreement (all 3 pairs)": "PAIR:t0,t1;t0,t2;t1,t2",
    "agreement (all 3 pairs, one 3-way join)": "JOIN3",
    "entropy": "ENTROPY",  # built per class count below: per-element indexing is ~3x faster than list lambdas
    "entropy (first version, two exps per class)": "ENTROPY2",
}


def agreement_sql(pairs: str) -> str:
    """How often two teachers' argmax agree. Each side is filtered to its teacher before the join (a self-join
    with `a.teacher < b.teacher` joins every teacher with every other first: ~1.5x slower here)."""
    am = "list_position(logits, list_max(logits))"
    side = "(SELECT corpus, part, \"row\", " + am + " AS p FROM labels WHERE teacher = '{}')"
    return " UNION ALL ".join(
        f"SELECT '{x}' AS teacher, '{y}' AS other, avg((a.p = b.p)::INT) AS agreement "
        f"FROM {side.format(x)} a JOIN {side.format(y)} b USING (corpus, part, \"row\")"
        for x, y in (pair.split(",") for pair in pairs.split(";"))
    )


def agreement_join_sql(teachers: list[str]) -> str:
    """All pairs' agreement from one N-way join (N-1 joins instead of N(N-1)/2), over the examples every
    teacher scored; one row per pair."""
    am = "list_position(logits, list_max(logits))"
    sides = [f"(SELECT corpus, part, \"row\", {am} AS p FROM labels WHERE teacher = '{t}') t{i}"
             for i, t in enumerate(teachers)]
    joined = sides[0] + "".join(f" JOIN {s} USING (corpus, part, \"row\")" for s in sides[1:])
    pairs = [(i, j) for i in range(len(teachers)) for j in range(i + 1, len(teachers))]
    cols = ", ".join(f"avg((t{i}.p = t{j}.p)::INT) AS a{i}_{j}" for i, j in pairs)
    rows = ", ".join(f"('{teachers[i]}', '{teachers[j]}', a{i}_{j})" for i, j in pairs)
    return f"SELECT v.* FROM (SELECT {cols} FROM {joined}) s, (VALUES {rows}) v(teacher, other, agreement)"


def entropy_sql(k: int) -> str:
    """Mean softmax entropy per teacher, H = ln z - sum_i e_i (l_i - m) / z with e_i = exp(l_i - m), m = max_i l_i:
    one exp per class (computing p_i and ln p_i separately took twice as many)."""
    m = "greatest(" + ", ".join(f"logits[{i}]" for i in range(1, k + 1)) + ")"
    d = ", ".join(f"logits[{i}] - m AS d{i}" for i in range(1, k + 1))
    e = ", ".join(f"d{i}, exp(d{i}) AS e{i}" for i in range(1, k + 1))
    z = " + ".join(f"e{i}" for i in range(1, k + 1))
    s = " + ".join(f"e{i} * d{i}" for i in range(1, k + 1))
    return (f"SELECT teacher, avg(ln({z}) - ({s}) / ({z})) AS mean_entropy FROM "
            f"(SELECT teacher, {e} FROM (SELECT teacher, {d} FROM (SELECT teacher, logits, {m} AS m FROM labels))) "
            "GROUP BY teacher")


def entropy_sql_two_exps(k: int) -> str:
    """The first version, kept for the comparison in BENCHMARKS.md."""
    m = "greatest(" + ", ".join(f"logits[{i}]" for i in range(1, k + 1)) + ")"
    z = " + ".join(f"exp(logits[{i}] - m)" for i in range(1, k + 1))
    h = " + ".join(f"(logits[{i}] - m - ln(z)) * exp(logits[{i}] - m) / z" for i in range(1, k + 1))
    return (f"SELECT teacher, avg(-({h})) AS mean_entropy FROM "
            f"(SELECT teacher, logits, m, {z} AS z FROM (SELECT teacher, logits, {m} AS m FROM labels)) GROUP BY teacher")


def build(root: Path, rows: int, classes: int, dtype: str, teachers: int = 3) -> Store:
    shutil.rmtree(root, ignore_errors=True)
    store = Store.create(root)
    rng = np.random.default_rng(0)
    recs = [TeacherRecord(f"t{i}", f"sha256:{i}", "synthetic", [str(c) for c in range(classes)], "float32", 128)
            for i in range(teachers)]
    for r in recs:
        store.write_teacher(r)
    parts = []
    for p, start in enumerate(range(0, rows, PART_ROWS)):
        n = min(PART_ROWS, rows - start)
        ids = rng.integers(-(2**63), 2**63 - 1, size=n, dtype=np.int64)
        table = pa.table({"id": ids, "text_a": pa.array(["q"] * n), "text_b": pa.array(["p"] * n),
                          "label": pa.array(rng.integers(0, classes, n), pa.int32()),
                          "group": pa.nulls(n, pa.string()), "source_id": pa.nulls(n, pa.string())})
        part = store.write_corpus_part("synthetic", p, table)
        parts.append(part)
        base = rng.normal(size=(n, classes)).astype(np.float32)
        for r in recs:  # teachers that mostly agree, as real ones do
            logits = base + 0.5 * rng.normal(size=(n, classes)).astype(np.float32)
            store.write_label_part(r, part, ids, logits, store_dtype=dtype)
    store.commit_corpus_parts("synthetic", [str(c) for c in range(classes)], parts, {"file": "synthetic"})
    return store


def label_bytes(store: Store) -> int:
    return sum(f.stat().st_size for f in store.label_files())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--size-rows", type=int, default=1_000_000, help="rows for the bytes/example measurements")
    ap.add_argument("--out", type=Path, default=Path("runs/bench-store"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"sizes": {}, "queries": {}}

    for classes in (2, 3):
        for dtype in ("float32", "float16"):
            store = build(args.out / f"size-{classes}-{dtype}", args.size_rows, classes, dtype)
            per = label_bytes(store) / args.size_rows / 3
            results["sizes"][f"{classes} classes, {dtype}"] = round(per, 2)
            print(f"{classes} classes, {dtype}: {per:.2f} bytes per example per teacher", flush=True)
            shutil.rmtree(store.root)

    for dtype in ("float16", "float32"):
        t = time.perf_counter()
        store = build(args.out / f"big-{dtype}", args.rows, 3, dtype)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        with connect(store) as (con, left):  # checks every part (digest, checksums, ids, finite) first
            open_s = time.perf_counter() - t
            assert not left.label_parts and not left.corpus_parts
            timings = {"build_seconds": round(build_s, 1), "open_seconds": round(open_s, 2), "rows": args.rows,
                       "teachers": 3, "classes": 3}
            print(f"{dtype} open (all parts checked): {open_s:.2f} s", flush=True)
            for name, sql in QUERIES.items():
                if sql == "ENTROPY":
                    sql = entropy_sql(3)
                elif sql == "ENTROPY2":
                    sql = entropy_sql_two_exps(3)
                elif sql == "JOIN3":
                    sql = agreement_join_sql(["t0", "t1", "t2"])
                elif sql.startswith("PAIR:"):
                    sql = agreement_sql(sql[5:])
                con.execute(sql).fetchall()  # warm the file cache and metadata
                t = time.perf_counter()
                result = con.execute(sql).fetchall()
                timings[name + "_seconds"] = round(time.perf_counter() - t, 3)
                print(f"{dtype} {name}: {timings[name + '_seconds']:.3f} s -> {result[:3]}", flush=True)
        results["queries"][dtype] = timings
        shutil.rmtree(store.root)
    (args.out / "store.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'store.json'}")


if __name__ == "__main__":
    main()
