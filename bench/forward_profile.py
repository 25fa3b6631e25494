"""Where the teacher's forward pass spends its time, and what torch.compile buys.

The labeler's useful FLOP/s reach ~0.7 of the fp32 GEMM peak (BENCHMARKS.md, section 1-4). This
profiles the bare forward on the labeler's own batches (WikiQA test, all-MiniLM-L6-v2 shape,
batch_tokens 4,096) with torch.profiler, splits the time into matrix multiplies and the rest, and
times eager against ``torch.compile`` on the same batches, alternated.

    python bench/forward_profile.py --out runs/bench-profile      # writes runs/bench-profile/profile.json
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from tmkd.teachers.cpu import bound_cpu_caches  # noqa: E402

bound_cpu_caches()  # as `tmkd-label run` does, before the first kernel

import numpy as np  # noqa: E402
import torch  # noqa: E402

from labeler import bert_flops, fresh_store, gemm_peak, make_teacher  # noqa: E402  (bench/ is the script's own folder)
from tmkd.data.store import Store  # noqa: E402
from tmkd.teachers.device import autocast_dtype, describe
from tmkd.teachers.scoring import encode_pairs, length_batches, pad_batch  # noqa: E402

GEMM_OPS = ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
            "aten::_scaled_dot_product_flash_attention_for_cpu", "mkldnn", "aten::_addmm_activation")


def timed(model, batches, amp) -> float:
    with torch.no_grad(), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        t = time.perf_counter()
        for b in batches:
            model(**b)
        return time.perf_counter() - t


def profile(model, batches, amp) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    with torch.no_grad(), torch.autocast("cpu", dtype=amp, enabled=amp is not None):
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for b in batches:
                model(**b)
    rows = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in rows)
    top = sorted(rows, key=lambda r: -r[1])[:12]
    gemm = sum(t for k, t in rows if any(k.startswith(g) for g in GEMM_OPS))
    return {"matmul_and_attention_share_of_op_time": gemm / total, "top_ops_self_share": {k: round(t / total, 3) for k, t in top},
            "table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-profile")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    teacher = make_teacher(args.out)
    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    source = args.data / "wikiqa" / "WikiQA-test.tsv.gz"
    store = Store(fresh_store(args.out, source, "store-texts"))
    table = store.read_corpus_part(store.corpus("test").parts[0])
    a, b = table.column("text_a").to_pylist(), table.column("text_b").to_pylist()
    enc = encode_pairs(tok, a, b, 128, "longest_first")
    batches = [pad_batch(enc, rows, tok.pad_token_id) for rows in length_batches(enc.lengths, 4096)]
    cfg = model.config
    flops = bert_flops(enc.lengths, cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size)
    peak = gemm_peak(torch.float32)
    results = {"pairs": len(a), "batches": len(batches), "fp32_gemm_peak_gflops": peak / 1e9}

    compiled = torch.compile(model, dynamic=True)
    for dtype in ("float32", "bfloat16"):
        amp = autocast_dtype(dtype, describe(torch.device("cpu")))
        timed(model, batches, amp)  # warm-up: kernels for every shape
        t_c = time.perf_counter()
        timed(compiled, batches, amp)  # compiles (dynamic shapes: once, not per batch length)
        compile_s = time.perf_counter() - t_c
        eager, comp = [], []
        for _ in range(args.rounds):
            eager.append(timed(model, batches, amp))
            comp.append(timed(compiled, batches, amp))
        e, c = float(np.median(eager)), float(np.median(comp))
        prof = profile(model, batches, amp)
        print(prof.pop("table"), flush=True)
        results[dtype] = {"eager_pairs_per_s": len(a) / e, "compiled_pairs_per_s": len(a) / c,
                          "compiled_over_eager": e / c, "compile_seconds": compile_s,
                          "eager_useful_flops_over_fp32_peak": flops / e / peak,
                          "compiled_useful_flops_over_fp32_peak": flops / c / peak, **prof}
        print(json.dumps({dtype: {k: v for k, v in results[dtype].items() if k != "top_ops_self_share"}}, indent=2),
              flush=True)
    (args.out / "profile.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'profile.json'}")


if __name__ == "__main__":
    main()
