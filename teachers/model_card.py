"""Model cards: the README.md (YAML header + text) of every fine-tuned teacher and exported student.

A folder that leaves the team (a model hub, another cluster) should say what it is without the
store beside it: its base model, the corpora it learnt from (names, rows, part digests), the
teachers it was distilled from (names, fingerprints), its config, its dev and test metrics, and
how to load it with plain transformers. The card is not among the files a teacher's fingerprint
hashes (weights, config.json, tokenizer), so writing it changes no identity.
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from tmkd.data.store import atomic_write_bytes

USAGE = '''from transformers import AutoModelForSequenceClassification, AutoTokenizer
import torch

folder = {folder}
tokenizer = AutoTokenizer.from_pretrained(folder)
model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
batch = tokenizer(["{text_a}"], ["{text_b}"], truncation=True, max_length={max_length}, return_tensors="pt")
with torch.no_grad():
    probs = model(**batch).logits.softmax(-1)
print(dict(zip(model.config.id2label.values(), probs[0].tolist())))
'''


def corpus_summary(manifest, role: str) -> dict:
    """Role (train, dev, test), rows and part digests of a store corpus: enough to tell later whether it is the
    same data."""
    return {"role": role, "rows": manifest.rows, "parts": [{"part": p.part, "rows": p.rows, "digest": p.digest}
                                                           for p in manifest.parts]}


def _metrics_table(metrics: dict) -> str:
    keys = [k for k in ("rows", "accuracy", "f1", "map", "mrr") if any(k in m for m in metrics.values())]
    lines = ["| split | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for split, m in metrics.items():
        lines.append(f"| {split} | " + " | ".join(f"{m[k]:.4f}" if isinstance(m.get(k), float) else str(m.get(k, "–"))
                                                 for k in keys) + " |")
    return "\n".join(lines)


def write_model_card(folder: Path, *, kind: str, name: str, base_model: str, label_names: list[str],
                     corpora: dict[str, dict], metrics: dict[str, dict], config: dict, max_length: int,
                     teachers: list[dict] = (), method: str = "") -> Path:
    """Write ``folder/README.md`` atomically; returns its path. ``kind``: "teacher" or "student"."""
    folder = Path(folder)
    meta = {
        "library_name": "transformers",
        "pipeline_tag": "text-classification",
        "tags": ["tmkd", "cross-encoder", "knowledge-distillation" if kind == "student" else "fine-tuned"],
        "tmkd": {"kind": kind, "name": name, "base_model": base_model, "label_names": list(label_names),
                 "corpora": corpora, "teachers": [{"name": t["name"], "fingerprint": t["fingerprint"]}
                                                  for t in teachers],
                 "metrics": metrics},
    }
    corpora_lines = "\n".join(f"- `{c}` ({v.get('role', 'train')}): {v['rows']:,} rows in {len(v['parts'])} parts "
                              "(digests in the header)" for c, v in corpora.items())
    teacher_lines = "\n".join(f"- `{t['name']}` ({t['fingerprint']})" for t in teachers)
    usage = USAGE.format(folder=repr(str(folder.resolve())), text_a="who wrote hamlet?", text_b="Hamlet is a tragedy written "
                         "by William Shakespeare.", max_length=max_length)
    body = [f"# {name}", "",
            f"A {'student distilled by tmkd' if kind == 'student' else 'teacher fine-tuned by tmkd'} "
            f"({method or kind}): a cross-encoder over a text pair, labels {', '.join(label_names)}.", "",
            f"**Base model:** `{base_model}`", "", "## Data", "", corpora_lines or "(none recorded)", ""]
    if teachers:
        body += ["## Teachers", "", teacher_lines, ""]
    body += ["## Metrics", "", _metrics_table(metrics) if metrics else "(not evaluated)", "",
             "## How to load it", "", "```python", usage.rstrip(), "```", "",
             "## Config", "", "```json", json.dumps(config, indent=2, sort_keys=True, default=str), "```", ""]
    text = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(body)
    path = folder / "README.md"
    atomic_write_bytes(path, text.encode())
    return path


def read_model_card(folder: Path) -> tuple[dict, str]:
    """(YAML header, body) of a card."""
    text = (Path(folder) / "README.md").read_text(encoding="utf-8")
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body
