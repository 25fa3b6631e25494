"""A trainer change changed no weights: two toy runs against weights saved before it.

    PYTHONPATH=tests python bench/recipe_equality.py save DIR       # with the code before a change
    PYTHONPATH=tests python bench/recipe_equality.py compare DIR    # with the code after it

(PYTHONPATH=tests: the runs use the tests' tiny models and toy store.)

The runs' micro-batches are all full (128 and 160 rows in batches of 16, accumulation 2), so
weighting each micro-batch by its rows is the same maths as weighting each by 1/N: the test
asserts torch.allclose(atol=1e-6) and reports the largest difference.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import tempfile

import toy
import torch


def _stage(name, corpora, **kw):
    s = {"name": name, "corpora": corpora, "epochs": 2, "batch_size": 16, "lr": 2e-3, "schedule": "linear",
         "warmup_ratio": 0.1, "loss": {"soft": kw.pop("soft", "mse"), "alpha": 0.5, **kw.pop("loss", {})}}
    s.update(kw)
    return s


def configs(store, encoder, out: Path) -> dict[str, dict]:
    """Name -> config dict: a classification run (accuracy) and a ranking run (MAP over groups)."""
    cls = toy.config(store, encoder, out / "classify", teachers=("t1", "t2"),
                     stages=[_stage("task", ["train"])])
    cls["eval"].update(metric="accuracy", positive_label="pos")
    cls["train"]["gradient_accumulation_steps"] = 2
    rank = toy.config(store, encoder, out / "rank", teachers=("t1", "t2", "t3"), teacher_weights={"t1": 2.0, "t2": 1.0,
                                                                                                  "t3": 1.0},
                      stages=[_stage("stage1", ["unlabeled"], gold=False),
                              _stage("stage2", ["train"], soft="kl", loss={"temperature": 2.0})])
    rank["eval"].update(metric="map", positive_label="pos")
    rank["train"]["gradient_accumulation_steps"] = 2
    return {"classify": cls, "rank": rank}


def train_all(store, encoder, out: Path) -> dict[str, dict[str, torch.Tensor]]:
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    from tmkd.student.config import config_from_dict
    from tmkd.student.train import run

    weights = {}
    for name, raw in configs(store, encoder, out).items():
        AcceleratorState._reset_state(reset_partial_state=True)
        run(config_from_dict(raw))
        weights[name] = load_file(str(Path(raw["output"]) / "model.safetensors"))
        AcceleratorState._reset_state(reset_partial_state=True)
    return weights


def save(ref: Path) -> None:
    from tiny import SHARED_DATA, build_bert, build_tokenizer, read_lines

    texts = []
    for line in read_lines(SHARED_DATA / "wikiqa" / "WikiQA-train.tsv.gz", 2000)[1:]:
        cols = line.rstrip("\r\n").split("\t")
        texts += [cols[1], cols[5]]
    tok = build_tokenizer(texts, ref / "tokenizer")
    encoder = build_bert(ref / "encoder", tok, num_labels=2, seed=1)
    toy.build_store(ref / "store", teachers=("t1", "t2", "t3"))
    train_all(ref / "store", encoder, ref / "runs")
    print(f"saved reference runs under {ref / 'runs'}")


def _last_step(out: Path) -> dict[str, torch.Tensor]:
    """The last checkpoint's model weights (saved by accelerate's save_state, or by torch.save before it)."""
    from safetensors.torch import load_file

    step = sorted((out / "checkpoints").glob("step-*"))[-1]
    if (step / "model.safetensors").exists():
        return load_file(str(step / "model.safetensors"))
    return torch.load(step / "model.pt", weights_only=True)


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def compare(REFERENCE: Path) -> None:
    from safetensors.torch import load_file

    tmp_path = Path(tempfile.mkdtemp(prefix="recipe-now-"))
    now = train_all(REFERENCE / "store", REFERENCE / "encoder", tmp_path)
    report = {}
    for name, w in now.items():
        before = load_file(str(REFERENCE / "runs" / name / "model.safetensors"))
        report[name] = max_abs_diff(w, before)
        assert all(torch.allclose(w[k], before[k], atol=1e-6, rtol=0) for k in w), (name, report[name])
        final_before = _last_step(REFERENCE / "runs" / name)
        final_now = _last_step(tmp_path / name)
        report[name + " (last step)"] = max_abs_diff(final_now, final_before)
        assert all(torch.allclose(final_now[k], final_before[k], atol=1e-6, rtol=0) for k in final_now)
        ref_lines = (REFERENCE / "runs" / name / "metrics.jsonl").read_text().splitlines()
        now_lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        for x, y in zip(map(json.loads, ref_lines), map(json.loads, now_lines)):
            assert abs(x["train_loss"] - y["train_loss"]) < 1e-6 and x.get("eval_map") == y.get("eval_map")
    print("max abs difference per run:", json.dumps(report))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("save", "compare"):
        (save if sys.argv[1] == "save" else compare)(Path(sys.argv[2]))
    else:
        sys.exit(__doc__)
