"""The report's one HTML page: tables, and matplotlib charts inlined as SVG.

matplotlib draws every chart (heatmaps, histograms, reliability diagrams, curves) and writes it
as SVG text, which goes straight into the page: no script, no font or image to fetch, nothing
outside the file, so it can be mailed or attached to a ticket and opens offline. Every piece of
user text (corpus and teacher names, pair texts, paths) is escaped.
"""
from __future__ import annotations

import html
import io
import re

import matplotlib

matplotlib.use("Agg")  # no display: draw to memory
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tmkd.pipeline.report import BINS  # noqa: E402

plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "tmkd", "font.size": 9, "figure.dpi": 96,
                     "axes.spines.top": False, "axes.spines.right": False})
CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #1b1f24; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; } td, th { border: 1px solid #d0d7de; padding: 3px 8px; }
th { background: #f6f8fa; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.warn { background: #fff8c5; border: 1px solid #d4a72c; padding: .5em 1em; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; } figure { margin: 0; } figcaption { color: #57606a; font-size: .9em; }
.muted { color: #57606a; } code { font-size: .92em; } td.text { max-width: 380px; }
"""


def esc(value) -> str:
    return html.escape("" if value is None else str(value))


def num(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def svg(fig) -> str:
    """A matplotlib figure as inline SVG markup (no XML prolog, no DOCTYPE)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def figure(fig, caption: str) -> str:
    return f'<figure class="chart">{svg(fig)}<figcaption>{esc(caption)}</figcaption></figure>'


def table(head: list[str], rows: list[list], numeric_from: int = 1) -> str:
    out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td class="n">{esc(v)}</td>' if i >= numeric_from else f"<td>{esc(v)}</td>"
                                     for i, v in enumerate(row)) + "</tr>")
    return "".join(out) + "</table>"


def heatmap(ax, matrix, names: list[str], title: str) -> None:
    m = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    im = ax.imshow(m, vmin=min(0.0, np.nanmin(m)) if np.isfinite(m).any() else 0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", color="w" if m[i, j] < 0.6 else "k")
    ax.set_title(title)
    ax.figure.colorbar(im, ax=ax, shrink=0.8)


def coverage_section(data: dict) -> str:
    rows = []
    for c, e in data["corpora"].items():
        for t, cov in e["coverage"].items():
            rows.append([c, t, f"{cov['valid']}/{cov['parts']}", cov["committed"], cov["stale"], cov["damaged"],
                         cov["missing"], f"{cov['rows_valid']:,}/{cov['rows']:,}"])
    if not rows:
        return "<p>No teacher scores these corpora yet.</p>"
    return table(["corpus", "teacher", "parts valid", "committed", "stale", "damaged", "missing", "rows valid"],
                 rows, numeric_from=2)


def agreement_section(data: dict) -> str:
    out = []
    for c, e in data["corpora"].items():
        if len(e["teachers"]) < 2:
            continue
        n = len(e["teachers"])
        fig, axes = plt.subplots(1, 2, figsize=(3.6 + 1.1 * n * 2, 1.8 + 0.6 * n), layout="constrained")
        heatmap(axes[0], e["agreement"], e["teachers"], "argmax agreement")
        heatmap(axes[1], e["correlation"], e["teachers"], "probability correlation")
        out.append(figure(fig, f"{c}: {e['pairs_scanned']:,} pairs"))
    return '<div class="charts">' + "".join(out) + "</div>" if out else "<p>Fewer than two teachers per corpus.</p>"


def confidence_section(data: dict) -> str:
    out = []
    edges = np.linspace(0, 1, BINS + 1)
    for c, e in data["corpora"].items():
        teachers = [t for t in e["teachers"] if t in e["calibration"]]
        if not teachers:
            continue
        fig, ax = plt.subplots(figsize=(4.6, 2.8))
        for t in teachers:
            hist = np.array(e["calibration"][t]["histogram"], dtype=float)
            ax.stairs(hist / max(hist.sum(), 1), edges, label=t, linewidth=1.5)
        ax.set_xlabel("max softmax probability")
        ax.set_ylabel("share of pairs")
        ax.set_xlim(1 / max(len(e["label_names"] or [2]), 2) - 0.05, 1)
        ax.legend(frameon=False)
        out.append(figure(fig, f"{c}: confidence per teacher"))
    return '<div class="charts">' + "".join(out) + "</div>" if out else "<p>No scores.</p>"


def calibration_section(data: dict) -> str:
    out = []
    for c, e in data["corpora"].items():
        cal = {w: v for w, v in e["calibration"].items() if v.get("labelled")}
        if not cal:
            continue
        fig, ax = plt.subplots(figsize=(4.2, 3.4))
        ax.plot([0, 1], [0, 1], color="#999", linestyle=":", linewidth=1)
        for w, v in cal.items():
            xs = [b["confidence"] for b in v["bins"]]
            ys = [b["accuracy"] for b in v["bins"]]
            ax.plot(xs, ys, marker="o", markersize=3, label=f"{w} (ECE {v['ece']:.3f})",
                    linestyle="--" if w == "ensemble" else "-")
        ax.set_xlabel("confidence (mean, per bin)")
        ax.set_ylabel("accuracy")
        ax.legend(frameon=False, fontsize=8)
        rows = []
        for w, v in cal.items():
            r = e.get("ranking", {}).get(w, {})
            rows.append([w, v["labelled"], num(v["accuracy"]), num(v["ece"]), num(r.get("map")), num(r.get("mrr")),
                         num(r.get("groups"))])
        out.append(f"<h3>{esc(c)}</h3>" + '<div class="charts">' + figure(fig, f"{c}: reliability") + "<div>"
                   + table(["teacher", "labelled", "accuracy", "ECE", "MAP", "MRR", "groups"], rows) + "</div></div>")
    return "".join(out) if out else "<p>No labelled corpus.</p>"


def disagreement_section(data: dict) -> str:
    out = []
    for c, e in data["corpora"].items():
        if not e["disagreements"]:
            continue
        head = ["part/row", "text a", "text b", "gold", "spread"] + e["teachers"]
        rows = []
        for d in e["disagreements"]:
            cells = [f"{d['part']}/{d['row']}", d["text_a"], d["text_b"], d["label"], num(d["spread"])]
            cells += ["/".join(f"{p:.2f}" for p in d["probs"][t]) if t in d["probs"] else "–" for t in e["teachers"]]
            rows.append(cells)
        body = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
        for r in rows:
            body.append("<tr>" + "".join(f'<td class="text">{esc(v)}</td>' if i in (1, 2) else f"<td>{esc(v)}</td>"
                                         for i, v in enumerate(r)) + "</tr>")
        names = "/".join(e["label_names"] or [])
        out.append(f"<h3>{esc(c)}</h3><p class=muted>probabilities per teacher ({esc(names)}); spread: the largest "
                   "difference between two teachers' probability of one class</p>" + "".join(body) + "</table>")
    return "".join(out) if out else "<p>The teachers agree everywhere (or fewer than two score a corpus).</p>"


def students_section(data: dict) -> str:
    out = []
    teacher_metrics = {}
    for c, e in data["corpora"].items():
        for w, v in e["calibration"].items():
            teacher_metrics[(c, w, "accuracy")] = v.get("accuracy")
        for w, v in e.get("ranking", {}).items():
            teacher_metrics[(c, w, "map")] = v["map"]
            teacher_metrics[(c, w, "mrr")] = v["mrr"]
    for s in data["students"]:
        curves = s["curves"]
        metric = s["metric"] or "accuracy"
        fig, axes = plt.subplots(1, 2, figsize=(8.4, 2.8), layout="constrained")
        for stage in sorted({r.get("stage") for r in curves}, key=str):
            rows = [r for r in curves if r.get("stage") == stage]
            steps = [r.get("step") for r in rows]
            axes[0].plot(steps, [r.get("train_loss") for r in rows], marker="o", markersize=3, label=str(stage))
            axes[1].plot(steps, [r.get(f"eval_{metric}") for r in rows], marker="o", markersize=3, label=str(stage))
        axes[0].set_title("training loss")
        axes[1].set_title(f"dev {metric}" + (f" ({s['eval_corpus']})" if s["eval_corpus"] else ""))
        for ax in axes:
            ax.set_xlabel("step")
            ax.legend(frameon=False)
        best = s.get("best") or {}
        rows = [[f"student ({s['variant']})", num(best.get("value"))]]
        for t in s["teachers"]:
            rows.append([t["name"], num(teacher_metrics.get((s["eval_corpus"], t["name"], metric)))])
        rows.append(["teacher ensemble", num(teacher_metrics.get((s["eval_corpus"], "ensemble", metric)))])
        teachers = table(["teacher", "fingerprint", "in the store now"],
                         [[t["name"], t["fingerprint"], "yes" if t["in_store"] else "no (changed or removed)"]
                          for t in s["teachers"]], numeric_from=9)
        out.append(f"<h3>{esc(s['name'])} <span class=muted>({esc(s['path'])})</span></h3>"
                   f"<p>{esc(s['variant'])}, {esc(s['status'])}, {num(s['steps'])} steps; best dev {esc(metric)} "
                   f"{num(best.get('value'))} at {esc(best.get('stage'))} epoch {esc(best.get('epoch'))}</p>"
                   + '<div class="charts">' + figure(fig, f"{s['name']}: curves per stage") + "<div>"
                   + table([f"dev {metric} ({s['eval_corpus']})", "value"], rows) + "</div></div>" + teachers)
    return "".join(out)


def render(data: dict) -> str:
    warn = ""
    left = data["left_out"]
    if left["corpus_parts"] or left["label_parts"]:
        items = "".join(f"<li>{esc(x)}</li>" for x in left["corpus_parts"] + left["label_parts"])
        warn = f'<div class="warn"><b>Parts left out as invalid</b> (run <code>tmkd-label verify</code>):<ul>{items}</ul></div>'
    teachers = table(["teacher", "fingerprint", "labels"],
                     [[t["name"], t["fingerprint"], ", ".join(t["label_names"])] for t in data["teachers"]],
                     numeric_from=9)
    sections = [("Coverage", coverage_section(data)), ("Teacher agreement", agreement_section(data)),
                ("Confidence", confidence_section(data)), ("Calibration and ranking", calibration_section(data)),
                ("Disagreements", disagreement_section(data))]
    if data["students"]:
        sections.append(("Students", students_section(data)))
    body = "".join(f'<section id="{re.sub("[^a-z]+", "-", t.lower())}"><h2>{esc(t)}</h2>{s}</section>'
                   for t, s in sections)
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>tmkd report: {esc(data['store'])}</title>"
            f"<meta name=viewport content='width=device-width, initial-scale=1'><style>{CSS}</style></head><body>"
            f"<h1>Label store report</h1><p class=muted>{esc(data['store'])} · {len(data['corpora'])} corpora · "
            f"{len(data['teachers'])} teachers · computed in {data['seconds']} s</p>{warn}{teachers}{body}"
            "</body></html>")
