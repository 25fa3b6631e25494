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
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

from tmkd.data.ingest import IngestOptions, ingest
from tmkd.data.store import Store
from tmkd.pipeline.run import RunOptions, run

SYNC_MESSAGE = "synchroniz"  # "called a synchronizing CUDA operation"
ROOT = Path(__file__).resolve().parents[1]


def where(frame, filename: str, lineno: int) -> str:
    """Where a sync came from: the line it was reported at (``filename:lineno``, often inside a library: torch's
    storage.py syncs for whoever saves a tensor) and the innermost line of this project that led to it."""
    inner = f"{Path(filename).name}:{lineno}"
    if filename.startswith(str(ROOT)):
        return str(Path(filename).relative_to(ROOT)) + f":{lineno}"
    while frame is not None and not frame.f_code.co_filename.startswith(str(ROOT)):
        frame = frame.f_back
    if frame is None:
        return inner
    return f"{Path(frame.f_code.co_filename).relative_to(ROOT)}:{frame.f_lineno} -> {inner}"


@contextmanager
def counted_syncs(found: collections.Counter):
    """Count, by where they came from, the synchronizing CUDA calls made inside the block that PyTorch's sync debug
    mode reports (the calls it instruments: item(), blocking copies, synchronize(), ...; not allocator frees)."""
    def record(message, category, filename, lineno, file=None, line=None):
        if SYNC_MESSAGE in str(message):
            found[where(sys._getframe(1), filename, lineno)] += 1
        else:
            shown(message, category, filename, lineno, file, line)  # any other warning: shown as usual

    cuda = torch.cuda.is_available()
    with warnings.catch_warnings():
        shown = warnings.showwarning
        warnings.simplefilter("always")
        warnings.showwarning = record
        before = torch.cuda.get_sync_debug_mode() if cuda else None
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode(before)


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
            "pairs_per_s": summary.pairs / summary.scoring_seconds, "by_line": dict(found.most_common())}


def load_toy():
    """tests/toy.py, the small learnable store the tests train on, loaded from its file."""
    path = ROOT / "tests" / "toy.py"
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
            "syncs_per_step": total / max(result.steps, 1), "by_line": dict(found.most_common())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True, help="a sequence-classification folder (2 labels)")
    ap.add_argument("--pairs", type=Path, required=True, help="a WikiQA-format file to score")
    ap.add_argument("--teachers", type=int, default=2, help="teachers in the run (the same folder each time)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda", help="cpu only to try the script: it then counts nothing")
    args = ap.parse_args()
    args.teacher, args.pairs = args.teacher.resolve(), args.pairs.resolve()  # written into teachers.toml in OUT
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
