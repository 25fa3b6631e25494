"""tmkd-label run against sentence-transformers' CrossEncoder.predict: the same teacher, the same pairs, whole
processes (load, score, write), alternating, in one run.

What a user would write instead of `tmkd-label run` is a loop over ``CrossEncoder.predict`` (it sorts by length
and batches). For each precision this times, ``--rounds`` times in turn (the order swapped every round):

- tmkd:         `tmkd-label run` on a fresh copy of a store holding the pairs (the ingest is not timed);
- CrossEncoder: a Python process that loads ``CrossEncoder(teacher, max_length=128)`` (bf16: the weights in
                bf16, as its docs suggest), reads the same pairs from a Parquet file, predicts them (batch 32, the
                default), and saves the logits;
- optionally (``--onnx``, fp32 only) the same with ``backend="onnx"`` (needs optimum-onnx[onnxruntime], which
  pins transformers below 4.58: give it its own environment with ``--onnx-python``; the model is exported to ONNX
  once, before the timed runs).

It prints the median wall seconds and the median of the per-round ratios CrossEncoder / tmkd (so > 1 means tmkd
is faster), and checks that the two agree: predicted classes on >= 99.5% of pairs and logits within tolerance
(fp32: 1e-3; bf16: 0.1, which the two bf16 recipes' different rounding stays well inside), so the speed is not
bought with wrong answers. Useful FLOP/s (real tokens only) of tmkd's scoring phase and of its whole process, over
the device's GEMM peak measured here in the same dtype, come with it. On a machine with a GPU both score on it
(``--device``; default the GPU if there is one, as `tmkd-label run` picks); ``--device cpu`` keeps both on the CPU.

    pip install -e ".[bench]"    # sentence-transformers
    python bench/peer.py --teacher runs/wikiqa/teachers/minilm-list-a \\
        --pairs ../shared/data/wikiqa/WikiQA-train.tsv.gz --out runs/bench-peer    # writes runs/bench-peer/peer.json
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1}

CROSS_ENCODER = """
import sys, numpy as np, pyarrow.parquet as pq, torch
from sentence_transformers import CrossEncoder
folder, pairs, dtype, backend, device, out = sys.argv[1:]
kwargs = {"model_kwargs": {"dtype": torch.bfloat16}} if dtype == "bfloat16" else {}
if backend != "torch":
    kwargs["backend"] = backend
model = CrossEncoder(folder, max_length=128, device=device, **kwargs)
t = pq.read_table(pairs)
logits = model.predict(list(zip(t.column("text_a").to_pylist(), t.column("text_b").to_pylist())), batch_size=32,
                       show_progress_bar=False)
np.save(out, np.asarray(logits, dtype=np.float32))
"""


def timed(cmd: list[str], log: Path) -> float:
    """Wall seconds of ``cmd`` as a whole process; its output goes to ``log``; a failure stops the bench."""
    start = time.perf_counter()
    with open(log, "ab") as f:
        code = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"{' '.join(map(str, cmd))} exited with {code}: see {log}")
    return seconds


def setup(args) -> tuple[Path, Path, np.ndarray]:
    """A store with the pairs ingested (copied before every timed run), the pairs as Parquet for CrossEncoder,
    and the pairs' token lengths (for the FLOP count)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tmkd.data.store import Store
    from tmkd.teachers.scoring import encode_pairs, load_tokenizer

    base = args.out / "base-store"
    if not (base / "corpus" / "pairs" / "manifest.json").exists():
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run([BIN / "tmkd-label", "ingest", args.pairs, "--format", args.format, "--store", base,
                        "--corpus", "pairs"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    store = Store(base)
    tables = [store.read_corpus_part(p, ["text_a", "text_b"]) for p in store.corpus("pairs").parts]
    table = pa.concat_tables(tables)
    pairs = args.out / "pairs.parquet"
    pq.write_table(table, pairs)
    tok = load_tokenizer(args.teacher)
    lengths = encode_pairs(tok, table.column("text_a").to_pylist(), table.column("text_b").to_pylist(), 128,
                           "longest_first").lengths
    return base, pairs, lengths


def model_folder(args, backend: str) -> Path:
    """The teacher's folder for a CrossEncoder backend: for ONNX, a copy with the model exported to onnx/ (once,
    untimed: a user exports once and scores many times)."""
    if backend != "onnx":
        return args.teacher
    folder = args.out / "teacher-onnx"
    if not (folder / "onnx" / "model.onnx").exists():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(args.teacher, folder)
        export = ("import sys; from sentence_transformers import CrossEncoder; "
                  "CrossEncoder(sys.argv[1], backend='onnx', device='cpu').save_pretrained(sys.argv[1])")
        subprocess.run([args.onnx_python, "-c", export, folder], check=True, cwd=ROOT)
    return folder


def tmkd_logits(store_path: Path) -> np.ndarray:
    from tmkd.data.store import Store

    store = Store(store_path)
    rec = store.teacher("teacher")
    return np.concatenate([store.read_aligned(p, [rec], [])[1][:, 0] for p in store.corpus("pairs").parts])


def scoring_seconds(store_path: Path) -> float:
    """The scoring phase of the store's one `tmkd-label run` (from its run log): models loaded, parts read to
    labels written."""
    logs = sorted((store_path / "runs").glob("*.json"))
    return json.loads(logs[-1].read_text())["scoring_seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True, help="a sequence-classification folder (2 labels)")
    ap.add_argument("--pairs", type=Path, required=True, help="a corpus file tmkd-label ingest reads")
    ap.add_argument("--format", default="wikiqa", help="its ingest format")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--rounds", type=int, default=3, help="pairs of runs per precision (>= 3 for the bench)")
    ap.add_argument("--onnx", action="store_true", help="add CrossEncoder(backend='onnx') in float32")
    ap.add_argument("--onnx-python", default=sys.executable, help="the Python that has optimum-onnx[onnxruntime]")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... for both (default: the GPU if any)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.teacher = args.teacher.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "runs.log"
    base, pairs, lengths = setup(args)

    from transformers import AutoConfig

    from labeler import bert_flops, gemm_peak  # bench/ is this script's own folder
    import torch

    from tmkd.pipeline.run import pick_device
    from tmkd.teachers.device import autocast_dtype, describe
    from tmkd.teachers.first_token import ARCHITECTURES

    device = pick_device(args.device)

    cfg = AutoConfig.from_pretrained(args.teacher)
    # the FLOPs tmkd's forward does: its last layer computes the first token only where the head allows it
    # (tmkd.teachers.first_token; CrossEncoder computes every position, so its own count would be higher)
    first_token = bool(set(cfg.architectures or ()) & set(ARCHITECTURES))
    flops = bert_flops(lengths, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
                       first_token_last_layer=first_token)
    results = {"pairs": int(len(lengths)), "teacher": str(args.teacher), "rounds": args.rounds, "device": str(device),
               "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "first_token_last_layer": first_token,
               "precisions": {}}
    for dtype in args.dtypes:
        toml = args.out / f"teachers-{dtype}.toml"
        toml.write_text(f'[[teacher]]\nname = "teacher"\npath = "{args.teacher}"\nmax_length = 128\n'
                        f'dtype = "{dtype}"\n')
        contenders = {"tmkd": None, "cross-encoder": "torch"}
        if args.onnx and dtype == "float32":
            contenders["cross-encoder-onnx"] = "onnx"
        walls: dict[str, list[float]] = {k: [] for k in contenders}
        scoring = []
        for r in range(args.rounds):
            order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
            for who in order:
                if who == "tmkd":
                    store = args.out / f"store-{dtype}"
                    shutil.rmtree(store, ignore_errors=True)
                    shutil.copytree(base, store)
                    walls[who].append(timed([BIN / "tmkd-label", "run", "--store", store, "--teachers", toml,
                                             "--device", str(device)], log))
                    scoring.append(scoring_seconds(store))
                else:
                    out = args.out / f"{who}-{dtype}.npy"
                    python = args.onnx_python if contenders[who] == "onnx" else sys.executable
                    walls[who].append(timed([python, "-c", CROSS_ENCODER, model_folder(args, contenders[who]), pairs,
                                             dtype, contenders[who], str(device), out], log))
            print(f"{dtype} round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in walls.items()), flush=True)
        ours = tmkd_logits(args.out / f"store-{dtype}")
        amp = autocast_dtype(dtype, describe(device)) or torch.float32  # the dtype tmkd's matmuls ran in
        peak = gemm_peak(amp, device)
        entry = {"median_seconds": {k: statistics.median(v) for k, v in walls.items()}, "seconds": walls,
                 "tmkd_scoring_seconds": statistics.median(scoring), "gemm_peak_flops": peak,
                 "useful_flops_fraction_scoring": flops / statistics.median(scoring) / peak,
                 "useful_flops_fraction_whole_process": flops / statistics.median(walls["tmkd"]) / peak}
        for who in contenders:
            if who == "tmkd":
                continue
            theirs = np.load(args.out / f"{who}-{dtype}.npy")
            ratios = [b / a for a, b in zip(walls["tmkd"], walls[who])]
            diff = np.abs(theirs - ours)
            entry[who] = {"ratio_median": statistics.median(ratios), "ratios": ratios,
                          "class_agreement": float((theirs.argmax(1) == ours.argmax(1)).mean()),
                          "max_abs_diff": float(diff.max()), "p99_abs_diff": float(np.quantile(diff, 0.99))}
            tol = TOLERANCE[dtype]
            entry[who]["agree"] = entry[who]["class_agreement"] >= 0.995 and entry[who]["p99_abs_diff"] <= tol
        results["precisions"][dtype] = entry
    (args.out / "peer.json").write_text(json.dumps(results, indent=1) + "\n")

    print(f"\n{results['pairs']:,} pairs, {args.rounds} alternating rounds; {results['threads']} threads\n")
    print("| precision | tmkd-label run (s) | contender | contender (s) | **contender / tmkd** (median of rounds) "
          "| classes agree | p99 / max abs logit diff | logits agree | tmkd useful FLOP/s / GEMM peak: scoring, "
          "whole process |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype, e in results["precisions"].items():
        for who in e["median_seconds"]:
            if who == "tmkd":
                continue
            c = e[who]
            print(f"| {dtype} | {e['median_seconds']['tmkd']:.1f} | {who} | {e['median_seconds'][who]:.1f} | "
                  f"**{c['ratio_median']:.2f}×** | {c['class_agreement']:.4f} | {c['p99_abs_diff']:.4f} / "
                  f"{c['max_abs_diff']:.4f} | {'yes' if c['agree'] else 'NO'} | "
                  f"{e['useful_flops_fraction_scoring']:.2f}, {e['useful_flops_fraction_whole_process']:.2f} |")
    print(f"\nresults: {args.out / 'peer.json'}")
    if not all(e[w]["agree"] for e in results["precisions"].values() for w in e if isinstance(e[w], dict)
               and "agree" in e[w]):
        raise SystemExit("the logits disagree beyond tolerance: the speed figures do not count")


if __name__ == "__main__":
    main()
