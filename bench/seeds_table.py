"""Quality over seeds: a runs JSON (one object per run) -> the RESULTS.md tables, mean ± std and n.

    python bench/seeds_table.py bench/results/wikiqa-seeds.json [--metric test_map] [--compare tmkd mkd-matched]
    python bench/seeds_table.py round1.json round2.json --merged-out all.json   # runs from several bench invocations

The JSON is a list of {"variant", "seed", "dev_map", "test_map", "test_mrr", "test_accuracy"} (null where a
metric does not apply, e.g. MAP on QNLI). Per variant: mean ± sample standard deviation and n of each metric.
``--compare A B``: the difference A − B paired by seed (the same seeds in both), its mean, the standard error of
that mean, and whether the mean exceeds twice it (the bar issue #14 sets).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

METRICS = ("dev_map", "test_map", "test_mrr", "test_accuracy", "dev_accuracy")


def load_runs(paths: list[Path]) -> list[dict]:
    """The runs of several JSON files, in order. A run seen again (the same variant and seed: each bench invocation
    also re-evaluates the teachers) is kept once if its metrics agree within 1e-6, and refused if they do not."""
    runs: list[dict] = []
    seen: dict[tuple, tuple[dict, Path]] = {}
    for path in paths:
        for run in json.loads(path.read_text()):
            key = (run["variant"], run["seed"])
            if key in seen:
                first, where = seen[key]
                clash = [m for m in METRICS if (first.get(m) is None) != (run.get(m) is None)
                         or (run.get(m) is not None and abs(first[m] - run[m]) > 1e-6)]
                if clash:
                    raise SystemExit(f"{path}: {run['variant']} seed {run['seed']} has other {', '.join(clash)} "
                                     f"than in {where}; one of them is from other teachers or another run")
                continue
            seen[key] = (run, path)
            runs.append(run)
    return runs


def summarise(runs: list[dict]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """variant -> metric -> (mean, sample std, n), over the runs where the metric is not null."""
    out: dict[str, dict[str, tuple[float, float, int]]] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        values = {m: [r[m] for r in runs if r["variant"] == variant and r.get(m) is not None] for m in METRICS}
        out[variant] = {m: _mean_std(v) for m, v in values.items() if v}
    return out


def _mean_std(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else float("nan")
    return mean, std, n


def paired_difference(runs: list[dict], a: str, b: str, metric: str) -> dict:
    """A − B on the seeds both have: mean, standard error of the mean, and whether mean > 2 SE."""
    by_seed = {(r["variant"], r["seed"]): r[metric] for r in runs if r.get(metric) is not None}
    seeds = sorted({s for v, s in by_seed if v == a} & {s for v, s in by_seed if v == b})
    diffs = [by_seed[a, s] - by_seed[b, s] for s in seeds]
    if len(diffs) < 2:
        return {"seeds": seeds, "mean": diffs[0] if diffs else None, "se": None, "beyond_2se": None}
    mean, std, n = _mean_std(diffs)
    se = std / math.sqrt(n)
    return {"seeds": seeds, "mean": mean, "se": se, "beyond_2se": mean > 2 * se}


ORDER = ("tmkd", "mkd", "tkd", "nokd")  # the paper's order, best first


def bars(runs: list[dict], metric: str = "test_map", tmkd: str = "tmkd") -> list[tuple[str, bool | None, str]]:
    """The quality bars of issue #14, as (claim, held, the numbers): TMKD's mean >= the teacher ensemble's;
    TMKD − MKD-matched, paired by seed, beyond twice its standard error; TMKD >= MKD >= TKD >= no-KD on the
    means. ``held`` is None where a variant is missing. ``tmkd`` names the variant that stands for TMKD (a lever's,
    e.g. tmkd-listwise)."""
    summary = summarise(runs)
    mean = {v: s[metric][0] for v, s in summary.items() if metric in s}
    n = {v: s[metric][2] for v, s in summary.items() if metric in s}
    out: list[tuple[str, bool | None, str]] = []
    name = "TMKD" if tmkd == "tmkd" else f"TMKD ({tmkd})"
    if tmkd in mean and "teacher-ensemble" in mean:
        out.append((f"{name} mean >= teacher ensemble", mean[tmkd] >= mean["teacher-ensemble"],
                    f"{mean[tmkd]:.4f} (n={n[tmkd]}) vs {mean['teacher-ensemble']:.4f}"))
    else:
        out.append((f"{name} mean >= teacher ensemble", None, "missing"))
    d = paired_difference(runs, tmkd, "mkd-matched", metric)
    if d["se"] is not None:
        out.append((f"{name} − MKD-matched > 2 SE", d["beyond_2se"],
                    f"{d['mean']:+.4f} ± {d['se']:.4f} SE over seeds {d['seeds']}"))
    else:
        out.append((f"{name} − MKD-matched > 2 SE", None, f"{len(d['seeds'])} shared seeds"))
    order = (tmkd, *ORDER[1:])
    have = [v for v in order if v in mean]
    held = None if len(have) < len(order) else all(mean[a] >= mean[b] for a, b in zip(order, order[1:]))
    shown = f"{have[0]} {mean[have[0]]:.4f}" if have else ""
    for a, b in zip(have, have[1:]):  # each sign as the means have it: a failed step shows as "<"
        shown += f" {'>=' if mean[a] >= mean[b] else '<'} {b} {mean[b]:.4f}"
    out.append((f"{name} >= MKD >= TKD >= no-KD (means)", held, shown))
    return out


def markdown(summary: dict, metrics: tuple[str, ...] = METRICS) -> str:
    shown = [m for m in metrics if any(m in s for s in summary.values())]
    lines = ["| variant | " + " | ".join(shown) + " | n |", "|---|" + "---|" * (len(shown) + 1)]
    for variant, s in summary.items():
        cells = [f"{s[m][0]:.4f} ± {s[m][1]:.4f}" if m in s and s[m][2] > 1 else
                 (f"{s[m][0]:.4f}" if m in s else "–") for m in shown]
        n = max((s[m][2] for m in shown if m in s), default=0)
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {n} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+", help="one or more runs JSON files (merged: see load_runs)")
    ap.add_argument("--merged-out", type=Path, help="also write the merged runs to this JSON file")
    ap.add_argument("--metric", default="test_map", help="the metric --compare uses")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), action="append", default=[])
    ap.add_argument("--bars", action="store_true", help="check the quality bars (TMKD vs the ensemble, MKD-matched, "
                                                        "and the paper's order) on --metric")
    ap.add_argument("--tmkd", default="tmkd", help="the variant that stands for TMKD in --bars (e.g. tmkd-listwise)")
    args = ap.parse_args()
    runs = load_runs(args.runs)
    if args.merged_out:
        args.merged_out.write_text(json.dumps(runs, indent=1) + "\n")
    print(markdown(summarise(runs)))
    for a, b in args.compare:
        d = paired_difference(runs, a, b, args.metric)
        # the bar is one-sided (A ahead of B); a B ahead beyond 2 SE is said too, not shown as a plain False
        behind = d["se"] is not None and d["mean"] < -2 * d["se"]
        print(f"\n{a} − {b} ({args.metric}, seeds {d['seeds']}): mean {d['mean']}, SE {d['se']}, "
              f"beyond 2 SE: {d['beyond_2se']}" + (f" ({b} ahead beyond 2 SE)" if behind else ""))
    if args.bars:
        print(f"\n| claim ({args.metric}) | held | numbers |\n|---|---|---|")
        for claim, held, detail in bars(runs, args.metric, args.tmkd):
            print(f"| {claim} | {'yes' if held else 'no' if held is False else 'n/a'} | {detail} |")


if __name__ == "__main__":
    main()
