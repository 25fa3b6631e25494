"""Count the host syncs of `tmkd-label run` and of a student training run on a GPU.

A host sync (``.item()``, ``.cpu()``, a blocking copy, ``torch.cuda.synchronize``) stalls the CPU until the GPU
has caught up, so the next batch cannot be queued behind the running one. The labeler and the trainer are written
to read results back in batches of batches, never once per batch. This checks it: PyTorch's sync debug mode
(``torch.cuda.set_sync_debug_mode("warn")``) warns at every synchronizing call, and the warnings are counted per
forward pass (labeler) and per optimizer step (trainer), with the lines they came from.

    python bench/host_syncs.py --teacher FOLDER --pairs ../shared/data/wikiqa/WikiQA-train.tsv.gz --out runs/syncs

Needs a CUDA GPU (the CPU has nothing to sync with). Writes OUT/host_syncs.json.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from tmkd.data.ingest import IngestOptions, ingest
from tmkd.data.store import Store
from tmkd.pipeline.run import RunOptions, run

SYNC_MESSAGE = "synchroniz"  # "called a synchronizing CUDA operation"


@contextmanager
def counted_syncs(found: collections.Counter):
    """Count, by the Python line that made them, the synchronizing CUDA calls made inside the block."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    for w in seen:
        if SYNC_MESSAGE in str(w.message):
            found[f"{Path(w.filename).name}:{w.lineno}"] += 1


def labeler_syncs(args) -> dict:
    store = args.out / "store"
    shutil.rmtree(store, ignore_errors=True)
    ingest(Store.create(store), [args.pairs], IngestOptions(format="wikiqa", corpus="pairs"))
    toml = args.out / "teachers.toml"
    toml.write_text("".join(f'[[teacher]]\nname = "t{i}"\npath = "{args.teacher}"\nmax_length = 128\n'
                            f'dtype = "{args.dtype}"\n' for i in range(args.teachers)))
    found: collections.Counter = collections.Counter()
    with counted_syncs(found):
        summary = run(RunOptions(store, toml, device=args.device))
    total = sum(found.values())
    return {"pairs": summary.pairs, "forward_passes": summary.forward_passes, "syncs": total,
            "syncs_per_forward_pass": total / max(summary.forward_passes, 1),
            "pairs_per_s": summary.pairs / summary.scoring_seconds, "by_line": dict(found.most_common(15))}


def load_toy():
    """tests/toy.py, the small learnable store the tests train on, loaded from its file."""
    path = Path(__file__).resolve().parents[1] / "tests" / "toy.py"
    spec = importlib.util.spec_from_file_location("toy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trainer_syncs(args) -> dict:
    toy = load_toy()
    from tmkd.student.config import config_from_dict
    from tmkd.student.train import run as train

    root = args.out / "toy"
    shutil.rmtree(root, ignore_errors=True)
    toy.build_store(root / "store", train=(512, 512), unlabeled=(1024, 1024), dev=(128,))
    stages = [
        {"name": "stage1", "corpora": ["unlabeled"], "epochs": 1, "batch_size": 32, "lr": 1e-4, "gold": False,
         "loss": {"soft": "mse"}},
        {"name": "stage2", "corpora": ["train"], "epochs": 2, "batch_size": 32, "lr": 1e-4,
         "loss": {"soft": "kl", "temperature": 2.0, "alpha": 0.5}},
    ]
    raw = toy.config(root / "store", args.teacher, root / "out", stages=stages)
    raw["student"] = {"encoder": str(args.teacher), "max_length": 64, "layers": [0, 1, 2]}
    raw["train"] = {"mixed_precision": "bf16"}
    found: collections.Counter = collections.Counter()
    with counted_syncs(found):
        result = train(config_from_dict(raw))
    total = sum(found.values())
    return {"steps": result.steps, "examples": result.examples, "syncs": total,
            "syncs_per_step": total / max(result.steps, 1), "by_line": dict(found.most_common(15))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True, help="a sequence-classification folder (2 labels)")
    ap.add_argument("--pairs", type=Path, required=True, help="a WikiQA-format file to score")
    ap.add_argument("--teachers", type=int, default=2, help="teachers in the run (the same folder each time)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda", help="cpu only to try the script: it then counts nothing")
    args = ap.parse_args()
    if args.device != "cpu" and not torch.cuda.is_available():
        raise SystemExit("host_syncs.py needs a CUDA GPU: on the CPU there is nothing to sync with")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu", "torch": torch.__version__}
    for name, job in (("labeler", labeler_syncs), ("trainer", trainer_syncs)):
        try:
            results[name] = job(args)
        except Exception as e:  # one job's failure still reports the other's count
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps({name: results[name]}, indent=2), flush=True)
    (args.out / "host_syncs.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'host_syncs.json'}")


if __name__ == "__main__":
    main()
