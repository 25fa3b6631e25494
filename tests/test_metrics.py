"""MAP / MRR (tmkd.teachers.metrics.map_mrr), the one implementation, against references.

- A brute-force reference written from the definition, with no sorting: a candidate's rank is
  1 + the candidates with a higher score + those with the same score earlier in the input.
  Compared on random rankings with many ties, groups interleaved, None groups, and groups
  that do not count (only relevant or only irrelevant candidates).
- ranx, on the same random rankings (a slow test: `pip install ranx`, then `pytest -m slow
  tests/test_metrics.py`; it passed with ranx 0.3.21 on 2026-11-29). ranx breaks ties in no defined order: it
  sorts with numba's np.argsort (quicksort, not stable), and its dict input even reverses the
  order of ties (ranx 0.3.21). So ranx gets, per group, scores without ties that rank the
  candidates as map_mrr does (tie rule checked above and by hand below), and, separately,
  the raw scores on tie-free rankings.
- The tie rule and the counted groups by hand, and bench/wikiqa_eval.py's use of map_mrr.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tmkd.teachers.metrics import map_mrr


def reference_ranks(scores: list[float]) -> list[int]:
    """1-based rank of each candidate, from the definition (no sort): higher score first, ties
    in input order."""
    return [1 + sum(t > s for t in scores) + sum(t == s for t in scores[:i]) for i, s in enumerate(scores)]


def reference_ap_rr(scores: list[float], relevant: list[bool]) -> tuple[float, float]:
    ranks = reference_ranks(scores)
    hit_ranks = sorted(r for r, rel in zip(ranks, relevant) if rel)
    precisions = [sum(h <= r for h in hit_ranks) / r for r in hit_ranks]
    return sum(precisions) / len(precisions), 1.0 / hit_ranks[0]


def random_case(rng: np.random.Generator, ties: bool):
    """Scores, relevance and group ids of a random set of groups, in a shuffled row order."""
    rows = []
    for g in range(int(rng.integers(1, 12))):
        n = int(rng.integers(1, 16))
        kind = rng.random()
        p = 1.0 if kind < 0.1 else 0.0 if kind < 0.2 else rng.uniform(0.1, 0.6)  # some groups don't count
        rel = rng.random(n) < p
        sc = rng.integers(0, int(rng.integers(1, 5)), n).astype(float) if ties else rng.normal(size=n)
        rows += [(s, r, f"g{g}") for s, r in zip(sc, rel)]
    rows += [(float(rng.normal()), bool(rng.random() < 0.5), None) for _ in range(int(rng.integers(0, 4)))]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    return (np.array([r[0] for r in rows]), np.array([r[1] for r in rows], bool), [r[2] for r in rows])


def by_group(groups) -> dict:
    out: dict = {}
    for i, g in enumerate(groups):
        if g is not None:
            out.setdefault(g, []).append(i)
    return out


@pytest.mark.parametrize("ties", [True, False])
def test_map_mrr_matches_brute_force_definition(ties):
    rng = np.random.default_rng(1234 + ties)
    for _ in range(300):
        scores, rel, groups = random_case(rng, ties)
        aps, rrs, total = [], [], 0
        for idx in by_group(groups).values():
            total += 1
            r = rel[idx]
            if r.all() or not r.any():
                continue
            ap, rr = reference_ap_rr(scores[idx].tolist(), r.tolist())
            one = map_mrr(scores[idx], r, ["q"] * len(idx))  # per group, so a wrong group can't hide in a mean
            assert one["groups_counted"] == 1
            assert one["map"] == pytest.approx(ap, rel=1e-12, abs=0)
            assert one["mrr"] == pytest.approx(rr, rel=1e-12, abs=0)
            aps.append(ap)
            rrs.append(rr)
        out = map_mrr(scores, rel, groups)
        assert (out["groups_counted"], out["groups_total"]) == (len(aps), total)
        assert out["map"] == pytest.approx(np.mean(aps) if aps else 0.0, rel=1e-12, abs=0)
        assert out["mrr"] == pytest.approx(np.mean(rrs) if rrs else 0.0, rel=1e-12, abs=0)


@pytest.mark.slow  # needs ranx: `pip install ranx` adds 581 MB (numba, scipy, pandas, ...) and a ~55 s JIT
@pytest.mark.parametrize("ties", [True, False])  # compile; the brute-force test above covers the same behaviour
def test_map_mrr_matches_ranx(ties):
    ranx = pytest.importorskip("ranx")
    rng = np.random.default_rng(99 + ties)
    qrels, run, ours = {}, {}, {"map": [], "mrr": []}
    for case in range(150):
        scores, rel, groups = random_case(rng, ties)
        for g, idx in by_group(groups).items():
            r = rel[idx]
            if r.all() or not r.any():  # ranx would count these (AP 1, or 0); map_mrr leaves them out
                continue
            q = f"q{len(qrels):06d}"  # ranx sorts query ids: these sort in insertion order
            # with ties: distinct scores that rank as map_mrr does (the tie rule is tested above);
            # without: ranx gets the raw scores
            sc = -np.array(reference_ranks(scores[idx].tolist()), float) if ties else scores[idx]
            qrels[q] = {f"d{i}": 1 for i, x in zip(idx, r) if x}
            run[q] = {f"d{i}": float(s) for i, s in zip(idx, sc)}
            one = map_mrr(scores[idx], r, [q] * len(idx))
            ours["map"].append(one["map"])
            ours["mrr"].append(one["mrr"])
    assert len(qrels) > 200
    got = ranx.evaluate(ranx.Qrels(qrels), ranx.Run(run), ["map", "mrr"], return_mean=False)
    for m in ("map", "mrr"):  # per query
        np.testing.assert_allclose(ours[m], got[m], rtol=1e-12, atol=0)


def test_ties_keep_input_order_by_hand():
    # all tied: the input order is the ranking [neg, pos, neg, pos]: AP = (1/2 + 2/4) / 2, RR = 1/2
    out = map_mrr(np.zeros(4), np.array([0, 1, 0, 1], bool), ["q"] * 4)
    assert out["map"] == pytest.approx(0.5) and out["mrr"] == pytest.approx(0.5)
    # the same scores, positives first in the input: AP = RR = 1
    out = map_mrr(np.zeros(4), np.array([1, 1, 0, 0], bool), ["q"] * 4)
    assert out["map"] == 1.0 and out["mrr"] == 1.0
    # ties only within a score: 0.5 (neg, pos) then 0.2 (pos, neg) -> [neg, pos, pos, neg]
    # AP = (1/2 + 2/3) / 2, RR = 1/2
    sc, rel = np.array([0.2, 0.5, 0.2, 0.5]), np.array([1, 0, 0, 1], bool)
    out = map_mrr(sc, rel, ["q"] * 4)
    assert out["map"] == pytest.approx((1 / 2 + 2 / 3) / 2) and out["mrr"] == pytest.approx(0.5)
    # a NaN score ranks last: [pos(1.0), neg(0.0), pos(nan)]: AP = (1 + 2/3) / 2
    out = map_mrr(np.array([np.nan, 1.0, 0.0]), np.array([1, 1, 0], bool), ["q"] * 3)
    assert out["map"] == pytest.approx((1 + 2 / 3) / 2) and out["mrr"] == 1.0
    # the float type of the scores doesn't change the order (float16 ties stay ties)
    s16 = np.array([1.0, 1.0001, 0.5], np.float16)  # 1.0001 rounds to 1.0 in float16
    assert map_mrr(s16, np.array([0, 1, 0], bool), ["q"] * 3)["mrr"] == 0.5


def test_groups_counted_and_empty():
    out = map_mrr(np.array([0.1, 0.2, 0.3]), np.array([1, 1, 0], bool), [None, "a", "b"])
    assert out == {"map": 0.0, "mrr": 0.0, "groups_counted": 0, "groups_total": 2}
    # relevance given as ints: non-zero = relevant
    out = map_mrr(np.array([0.9, 0.1]), np.array([0, 2]), ["a", "a"])
    assert out["map"] == 0.5 and out["mrr"] == 0.5


def test_wikiqa_eval_uses_map_mrr():
    """bench/wikiqa_eval.py: rows outside the .ref don't take part, relevance comes from the .ref,
    questions are numbered by first appearance."""
    path = Path(__file__).resolve().parents[1] / "bench" / "wikiqa_eval.py"
    spec = importlib.util.spec_from_file_location("wikiqa_eval", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    positions = bench.ref_positions(["Q8/D1-0", "Q8/D1-1", "Q8/D1-2", "Q3/D2-0", "Q3/D2-1", "Q5/D4-0"])
    assert positions == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (3, 0)]
    ref = {(1, 0): 0, (1, 2): 1, (2, 0): 1, (2, 1): 0, (3, 0): 1}  # (1, 1) not in the .ref; Q5: only correct
    score = np.array([0.9, 0.8, 0.1, 0.4, 0.4, 0.0], np.float32)
    # Q8 without (1, 1): [neg, pos] -> AP = RR = 1/2; Q3 tied, input order [pos, neg] -> 1; Q5 not counted
    out = bench.ranking_metrics(score, positions, ref)
    assert out == {"map": 0.75, "mrr": 0.75, "questions": 2}
    rel = np.array([ref.get(p, 0) for p in positions], bool)
    m = map_mrr(score, rel, [p[0] if p in ref else None for p in positions])
    assert (m["map"], m["mrr"], m["groups_counted"]) == (out["map"], out["mrr"], out["questions"])
