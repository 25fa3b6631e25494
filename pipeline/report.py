"""`tmkd-label report`: the numbers behind the HTML report, computed by DuckDB over the store.

Everything about the labels is an aggregate that DuckDB computes over the read-only views of
``pipeline/query.py`` (the ``scores`` view: one row per pair, one logits column per teacher,
each part checked as it is read), in three scans of the store, whatever its size:

A. per corpus: pairs, rows and parts each teacher has valid, argmax agreement and probability
   correlation of every pair of teachers, accuracy, and the N pairs they disagree on most;
B. per corpus × teacher (and the ensemble) × confidence bin: counts, mean confidence and the
   labelled rows' accuracy: the confidence histograms, the reliability diagrams and ECE;
C. per corpus with groups and a positive class: MAP and MRR, ranked by the positive class's
   log-probability (ties in input order, as ``teachers/metrics.map_mrr``).

The ensemble is the mean of the logits of the teachers that score the corpus (as
``bench/wikiqa_eval.py``). Coverage (parts committed, stale, missing) comes from the commit
records, as ``status`` reads them; a part the scan finds damaged is counted as damaged.
Student runs are read from their ``run.json`` and ``metrics.jsonl``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tmkd.data.store import Store, StoreError, positive_index
from tmkd.pipeline.query import QueryError, build_views, connect_views
from tmkd.pipeline.streams import ScoresView
from tmkd.pipeline.status import coverage

BINS = 20  # confidence bins of width 0.05 (histograms, reliability diagrams, ECE)


class ReportError(StoreError):
    """A report that cannot be made as asked (an unknown corpus, an unreadable run folder)."""


@dataclass
class Scope:
    """The corpora in the report and, for each, the teachers that score it."""

    corpora: dict  # name -> CorpusManifest
    teachers: list[str]  # every teacher scoring one of them, in the view's column order
    scoring: dict[str, list[str]]  # corpus -> its teachers' names
    width: dict[str, int]  # corpus -> logits per row (its teachers' label count)


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _lit(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _per_corpus(scope: Scope, expr) -> str:
    """A CASE over the corpora: ``expr(teachers)`` for each corpus's own teachers (NULL if it has none)."""
    cases = " ".join(f"WHEN {_lit(c)} THEN {expr([_q(t) for t in ts])}" for c, ts in scope.scoring.items() if ts)
    return f"CASE corpus {cases} ELSE NULL END" if cases else "NULL"


def _ensemble(cols: list[str]) -> str:
    """The mean of the teachers' logits, element by element (NULL where one of them is NULL)."""
    return f"list_transform(range(1, len({cols[0]}) + 1), lambda i: ({' + '.join(f'{c}[i]' for c in cols)}) / {len(cols)})"


def _prepared(scope: Scope, view: str = "scores") -> str:
    """Per row: each teacher's probabilities (p_i) and decision (y_i), and the ensemble's (p_e, y_e)."""
    cols = ", ".join(f"probs({_q(t)}) AS p_{i}, predicted({_q(t)}) AS y_{i}" for i, t in enumerate(scope.teachers))
    ens = _per_corpus(scope, _ensemble)
    return (f"SELECT corpus, part, \"row\", label, \"group\", {cols}, probs(le) AS p_e, predicted(le) AS y_e "
            f"FROM (SELECT *, {ens} AS le FROM {view})")


def scan_a(con, scope: Scope, top: int) -> dict:
    """Counts, agreement, correlation, accuracy and the top disagreements, per corpus (one scan)."""
    n = len(scope.teachers)
    kmax = max(scope.width.values(), default=1)
    aggs = ["count(*) AS pairs", "count(label) AS labelled", 'count("group") AS grouped']
    for i in range(n):
        aggs += [f"count(p_{i}) AS rows_{i}", f"count(DISTINCT part) FILTER (WHERE p_{i} IS NOT NULL) AS parts_{i}",
                 f"avg((y_{i} = label)::INT) AS acc_{i}"]
        for j in range(i + 1, n):
            aggs.append(f"avg((y_{i} = y_{j})::INT) AS agree_{i}_{j}")
            aggs.append("[" + ", ".join(f"corr(p_{i}[{k}], p_{j}[{k}])" for k in range(1, kmax + 1)) + f"] AS corr_{i}_{j}")
    aggs.append("avg((y_e = label)::INT) AS acc_e")
    probs = ", ".join(f"p_{i}" for i in range(n))
    spread = (f"list_max(list_transform(range(1, len(coalesce({probs})) + 1), lambda k: "
              f"greatest({', '.join(f'p_{i}[k]' for i in range(n))}) - least({', '.join(f'p_{i}[k]' for i in range(n))})))"
              if n > 1 else "0.0")
    if top > 0:
        aggs.append(f"max_by({{'part': part, 'row': \"row\", 'spread': spread, 'probs': [{probs}], 'label': label}}, "
                    f"spread, {top}) FILTER (WHERE spread > 0) AS top")
    sql = (f"SELECT corpus, {', '.join(aggs)} FROM (SELECT *, {spread} AS spread FROM ({_prepared(scope)})) "
           "GROUP BY corpus ORDER BY corpus")
    return {r["corpus"]: r for r in _rows(con, sql)}


def scan_b(con, scope: Scope) -> list[dict]:
    """Per corpus × teacher (index, or -1: the ensemble) × confidence bin: rows, mean confidence, and over
    the labelled rows: count, correct, mean confidence (one scan)."""
    who = [(i, f"p_{i}", f"y_{i}") for i in range(len(scope.teachers))] + [(-1, "p_e", "y_e")]
    items = ", ".join(f"{{'who': {i}, 'conf': list_max({p}), 'correct': ({y} = label)::INT}}" for i, p, y in who)
    sql = (f"SELECT corpus, s.who AS who, least(floor(s.conf * {BINS}), {BINS - 1})::INT AS bin, count(*) AS n, "
           "avg(s.conf) AS conf, count(s.correct) AS labelled, sum(s.correct) AS correct, "
           "avg(s.conf) FILTER (WHERE s.correct IS NOT NULL) AS conf_labelled "
           f"FROM (SELECT corpus, unnest([{items}]) AS s FROM ({_prepared(scope)})) "
           "WHERE s.conf IS NOT NULL GROUP BY ALL ORDER BY ALL")
    return _rows(con, sql)


def scan_c(con, scope: Scope, positives: dict[str, int]) -> dict:
    """MAP and MRR per corpus, per teacher and for the ensemble, over the ``ranked`` view (one scan)."""
    who = [(str(i), _q(t)) for i, t in enumerate(scope.teachers)] + [("e", "le")]
    pos = "CASE corpus " + " ".join(f"WHEN {_lit(c)} THEN {k + 1}" for c, k in positives.items()) + " END"

    def logp(col):  # the positive class's log-probability, in double precision
        return (f"({col}[{pos}]::DOUBLE - list_max({col})::DOUBLE - ln(list_sum(list_transform({col}, "
                f"lambda x: exp(x::DOUBLE - list_max({col})::DOUBLE)))))")
    d = (f"SELECT corpus, \"group\" AS g, part, \"row\", label = {pos} - 1 AS rel, "
         + ", ".join(f"{logp(c)} AS s_{w}" for w, c in who)
         + f" FROM (SELECT *, {_per_corpus(scope, _ensemble)} AS le FROM ranked) "
         "WHERE \"group\" IS NOT NULL AND label IS NOT NULL")
    order = "PARTITION BY corpus, g ORDER BY s_{w} DESC NULLS LAST, part, \"row\""
    r = ("SELECT corpus, g, rel, " + ", ".join(
        f"count(s_{w}) OVER (PARTITION BY corpus, g) = count(*) OVER (PARTITION BY corpus, g) AS full_{w}, "
        f"row_number() OVER ({order.format(w=w)}) AS r_{w}, "
        f"sum(rel::INT) OVER ({order.format(w=w)} ROWS UNBOUNDED PRECEDING) AS h_{w}" for w, _ in who) + " FROM d")
    q = ("SELECT corpus, g, " + ", ".join(
        f"CASE WHEN bool_and(full_{w}) THEN avg(h_{w} / r_{w}) FILTER (WHERE rel) END AS ap_{w}, "
        f"CASE WHEN bool_and(full_{w}) THEN 1 / min(r_{w}) FILTER (WHERE rel) END AS rr_{w}" for w, _ in who)
         + " FROM r GROUP BY corpus, g HAVING bool_or(rel) AND NOT bool_and(rel)")
    sql = (f"WITH d AS ({d}), r AS ({r}), q AS ({q}) SELECT corpus, count(*) AS groups, "
           + ", ".join(f"avg(ap_{w}) AS map_{w}, avg(rr_{w}) AS mrr_{w}, count(ap_{w}) AS groups_{w}" for w, _ in who)
           + " FROM q GROUP BY corpus ORDER BY corpus")
    return {row["corpus"]: row for row in _rows(con, sql)}


def _rows(con, sql: str) -> list[dict]:
    try:
        result = con.execute(sql)
        names = [d[0] for d in result.description]
        return [dict(zip(names, row)) for row in result.fetchall()]
    except Exception as e:  # duckdb.Error; a failed scan stops the report with DuckDB's message
        raise QueryError(str(e)) from None


def _matrix(names: list[str], pairs: dict, diagonal: float) -> list[list[float | None]]:
    n = len(names)
    m = [[diagonal if i == j else None for j in range(n)] for i in range(n)]
    for (i, j), v in pairs.items():
        m[i][j] = m[j][i] = v
    return m


def _mean(values) -> float | None:
    vals = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def _calibration(rows: list[dict]) -> dict:
    """Confidence histogram, reliability bins, accuracy and ECE of one teacher (or the ensemble) on one corpus."""
    hist = [0] * BINS
    for r in rows:
        hist[r["bin"]] = r["n"]
    labelled = sum(r["labelled"] for r in rows)
    bins = [{"bin": r["bin"], "rows": r["labelled"], "confidence": r["conf_labelled"],
             "accuracy": r["correct"] / r["labelled"]} for r in rows if r["labelled"]]
    out = {"rows": sum(hist), "histogram": hist, "labelled": labelled, "bins": bins}
    if labelled:
        out["accuracy"] = sum(r["correct"] for r in rows) / labelled
        out["ece"] = sum(b["rows"] / labelled * abs(b["accuracy"] - b["confidence"]) for b in bins)
    return out


def _disagreements(store: Store, corpus, top: list[dict] | None, teachers: list[str], label_names) -> list[dict]:
    """The pairs the teachers disagree on most, with their texts (read from the checked corpus parts)."""
    if not top:
        return []
    parts = {p.part: p for p in corpus.parts}
    texts = {part: store.read_corpus_part(parts[part], ["id", "text_a", "text_b"])
             for part in sorted({t["part"] for t in top})}
    out = []
    for t in sorted(top, key=lambda t: (-t["spread"], t["part"], t["row"])):
        table = texts[t["part"]]
        label = t["label"]
        out.append({"part": t["part"], "row": t["row"], "id": table.column("id")[t["row"]].as_py(),
                    "text_a": table.column("text_a")[t["row"]].as_py(),
                    "text_b": table.column("text_b")[t["row"]].as_py(),
                    "label": None if label is None else (label_names[label] if label_names else label),
                    "spread": t["spread"],
                    "probs": {name: p for name, p in zip(teachers, t["probs"]) if p is not None}})
    return out


def read_run(path: Path, current: dict[str, str]) -> dict:
    """A student run folder: its teachers (and whether the store still has them), best and curves."""
    try:
        run = json.loads((path / "run.json").read_text())
        curves = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise ReportError(f"--runs {path}: not a student run folder (run.json and metrics.jsonl): {e}") from None
    teachers = [{"name": t["name"], "fingerprint": t["fingerprint"],
                 "in_store": current.get(t["name"]) == t["fingerprint"]} for t in run.get("teachers", [])]
    cfg = run.get("config", {})
    return {"path": str(path), "name": path.name, "variant": run.get("variant"), "status": run.get("status"),
            "teachers": teachers, "best": run.get("best"), "steps": run.get("steps"),
            "seconds": run.get("seconds"), "eval_corpus": cfg.get("eval", {}).get("corpus"),
            "metric": cfg.get("eval", {}).get("metric"), "curves": curves,
            "corpora": {name: {"rows": c.get("rows"), "parts": len(c.get("parts", []))}
                        for name, c in run.get("corpora", {}).items()}}


def build_report(store: Store, runs: list[Path] = (), corpora: list[str] | None = None, top: int = 20) -> dict:
    """Every number of the report, as plain JSON-able data."""
    started = time.perf_counter()
    names = store.corpora()
    for c in corpora or []:
        if c not in names:
            raise ReportError(f"--corpus {c}: no such corpus in the store (it has: {', '.join(names) or 'none'})")
    wanted = set(corpora or names)
    views, left = build_views(store, {"scores", "teachers", "corpora"}, only=wanted)
    scores: ScoresView = views["scores"]
    manifests = {c: store.corpus(c) for c in names if c in wanted}
    scope = Scope(manifests, scores.teachers, {c: [t.name for t in scores.scoring.get(c, [])] for c in manifests},
                  {c: len(ts[0].label_names) for c, ts in scores.scoring.items() if ts})
    records = store.teachers()
    status = [c for c in coverage(store) if c.corpus in wanted]

    positives = {}
    for c, m in manifests.items():
        try:
            positives[c] = positive_index(m.label_names, declared=m.positive_label) if m.label_names else None
        except StoreError:
            positives[c] = None  # no positive class: no ranking metrics
    data = {"store": str(store.root), "teachers": [{"name": t.name, "fingerprint": t.fingerprint,
                                                      "label_names": t.label_names} for t in records.values()],
            "corpora": {}, "students": [read_run(Path(r), {t.name: t.fingerprint for t in records.values()})
                                         for r in runs]}
    with connect_views(views) as con:
        a = scan_a(con, scope, top) if scope.teachers else {}
        b = scan_b(con, scope) if scope.teachers else []
        groups = {c for c, row in a.items() if row["labelled"] and row["grouped"] and positives.get(c) is not None}
        ranked = {}
        if groups:
            view = ScoresView(store, [(c, p) for c, p in scores.parts if c in groups], scores.scoring, left)
            view.seen = scores.seen  # the label parts read must be the ones scans A and B read
            con.register("ranked", view)
            ranked = scan_c(con, scope, {c: positives[c] for c in groups})
    for c, m in manifests.items():
        mine = scope.scoring[c]
        idx = {t: scope.teachers.index(t) for t in mine}
        row = a.get(c, {})
        entry = {"rows": m.rows, "parts": len(m.parts), "label_names": m.label_names,
                 "positive": m.label_names[positives[c]] if positives.get(c) is not None else None,
                 "teachers": mine, "pairs_scanned": row.get("pairs", 0), "labelled": row.get("labelled", 0),
                 "coverage": {}}
        for s in status:
            if s.corpus != c:
                continue
            i = idx.get(s.teacher)
            damaged = sum(1 for (t, cc, _) in scores.damaged if t == s.teacher and cc == c)
            entry["coverage"][s.teacher] = {
                "parts": s.total, "committed": s.done, "stale": s.stale, "missing": s.total - s.done - s.stale,
                "damaged": damaged, "valid": row.get(f"parts_{i}", 0) if i is not None else 0,
                "rows_valid": row.get(f"rows_{i}", 0) if i is not None else 0, "rows": s.rows_total}
        ids = [idx[t] for t in mine]
        entry["agreement"] = _matrix(mine, {(x, y): row.get(f"agree_{min(ids[x], ids[y])}_{max(ids[x], ids[y])}")
                                            for x in range(len(ids)) for y in range(x + 1, len(ids))}, 1.0)
        k = scope.width.get(c, 0)
        entry["correlation"] = _matrix(mine, {(x, y): _mean((row.get(f"corr_{min(ids[x], ids[y])}_{max(ids[x], ids[y])}")
                                                              or [])[:k])
                                              for x in range(len(ids)) for y in range(x + 1, len(ids))}, 1.0)
        entry["calibration"] = {}
        for who, name in [(idx[t], t) for t in mine] + ([(-1, "ensemble")] if len(mine) > 1 else []):
            rows = [r for r in b if r["corpus"] == c and r["who"] == who]
            if rows:
                entry["calibration"][name] = _calibration(rows)
        if c in ranked:
            r = ranked[c]
            entry["ranking"] = {name: {"map": r[f"map_{w}"], "mrr": r[f"mrr_{w}"], "groups": r[f"groups_{w}"]}
                                for name, w in [(t, str(idx[t])) for t in mine]
                                + ([("ensemble", "e")] if len(mine) > 1 else [])}
        entry["disagreements"] = _disagreements(store, m, row.get("top"), scope.teachers, m.label_names)
        data["corpora"][c] = entry
    data["left_out"] = {"corpus_parts": left.corpus_parts, "label_parts": left.label_parts}
    data["seconds"] = round(time.perf_counter() - started, 2)
    return data
