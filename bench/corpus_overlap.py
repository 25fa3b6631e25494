"""How a stage-1 corpus overlaps the hand-built one and the labelled train pairs (exact text matches, DuckDB).

For each corpus named: its pairs, how many of them are also in ``--reference`` (the hand-built stage-1 corpus),
and how many of ``--train``'s pairs (and of its correct answers, label 1) it contains. Read-only: through
`tmkd-label query`'s connection (pipeline/query.py), which checks every part it reads and can touch no file.

    python bench/corpus_overlap.py --store runs/wikiqa/store wikiqa-bm25 wikiqa-bm25-x3
"""
from __future__ import annotations

import argparse

from tmkd.data.store import Store
from tmkd.pipeline.query import connect


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True)
    ap.add_argument("--reference", default="wikiqa-unlabeled", help="the hand-built stage-1 corpus")
    ap.add_argument("--train", default="wikiqa-train", help="the labelled train corpus")
    ap.add_argument("corpora", nargs="+")
    args = ap.parse_args()
    names = [*args.corpora, args.reference, args.train]
    copy = "create temp table pairs as select corpus, text_a, text_b, label from corpus where list_contains($names, corpus)"
    with connect(Store(args.store), copy) as (con, left):
        con.execute(copy, {"names": names})  # the corpus view is a checked stream, read once
        if left.corpus_parts:  # a damaged part is never read: say so rather than count around it
            raise SystemExit(f"corpus parts left out (damaged): {left.corpus_parts}")
        print("| corpus | pairs | also in the hand-built corpus | train pairs it holds | of them correct (of all) |")
        print("|---|---|---|---|---|")
        for name in args.corpora:
            row = con.execute(
                """
                with m as (select text_a, text_b from pairs where corpus = $m),
                     h as (select text_a, text_b from pairs where corpus = $h),
                     t as (select text_a, text_b, label from pairs where corpus = $t)
                select (select count(*) from m),
                       (select count(*) from m semi join h using (text_a, text_b)),
                       (select count(*) from t semi join m using (text_a, text_b)),
                       (select count(*) from t semi join m using (text_a, text_b) where t.label = 1),
                       (select count(*) from t where label = 1)
                """,
                {"m": name, "h": args.reference, "t": args.train},
            ).fetchone()
            print(f"| {name} | {row[0]:,} | {row[1]:,} | {row[2]:,} | {row[3]:,} ({row[4]:,}) |")

if __name__ == "__main__":
    main()
