"""The scorer's speed levers (issue 15), each timed against today's setting on the same batches, alternated.

`tmkd-label run` spends 93-98% of its time in the teacher's forward (BENCHMARKS.md, sections 1-4 and 9), so a
lever has to make the forward itself faster. This times the bare forward on the labeler's own batches (WikiQA
test's 6,165 pairs, a real teacher folder), with tensors built beforehand, for:

- ``fp32-first-token``, ``bf16-autocast-first-token``: the last layer computed for the first token only, the one
  position the head reads (tmkd.teachers.first_token; `tmkd-label run`'s default since 2026-11-30), against fp32
  and bf16 autocast with the full last layer;
- ``bf16-weights``: the model cast to bfloat16 (every op in bf16), against bf16 autocast over fp32 weights
  (today: matmuls in bf16; layer norms, GELU, softmax and residual adds in fp32, with a cast around each);
- ``tokens-N``: N padded tokens per batch instead of the CPU default of 4,096;
- ``compile``: ``torch.compile(dynamic=True)`` of the same model (with ``--compile``; it compiles first);
- ``onnxruntime`` and ``onnxruntime-fused`` (with ``--onnx model.onnx``, fp32): the teacher exported to ONNX, run by
  ONNX Runtime as exported and after its BERT graph fusions (attention, skip layer norm, bias GELU: the non-GEMM ops
  a fused kernel removes), on the same padded batches. ``bench/peer.py --onnx`` exports one; ``pip install -e
  ".[bench]"``;
- ``onnxruntime-torchscript``, ``onnxruntime-dynamo`` (and ``-torchscript-fused``) with ``--onnx-export``: the same,
  but exported here, in this project's environment, by torch.onnx's two exporters (no optimum-onnx);
- padding-free attention is not run but bounded: the share of padded positions in these batches is the most
  it could save.

Each variant's logits are compared with fp32's (classes agree, max |diff|), so a speed-up is not bought with
wrong answers. Rounds alternate the variants in a rotated order; the ratio is the median over rounds of
baseline seconds / variant seconds.

    python bench/forward_levers.py --teacher runs/wikiqa/teachers/minilm-list-a --threads 1 --out runs/bench-levers
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]

from tmkd.teachers.cpu import bound_cpu_caches  # noqa: E402

bound_cpu_caches()  # as `tmkd-label run` does, before the first kernel

import numpy as np  # noqa: E402
import torch  # noqa: E402

from labeler import fresh_store  # noqa: E402  (bench/ is the script's own folder)
from tmkd.data.store import Store  # noqa: E402
from tmkd.teachers.first_token import wrap_last_layer  # noqa: E402
from tmkd.teachers.scoring import encode_pairs, length_batches, load_scoring_model, pad_batch  # noqa: E402


def batches_for(enc, pad_id: int, batch_tokens: int) -> list[tuple[np.ndarray, dict]]:
    return [(rows, pad_batch(enc, rows, pad_id)) for rows in length_batches(enc.lengths, batch_tokens)]


def forward(model, batches, amp, n: int) -> tuple[float, np.ndarray]:
    """Seconds for every batch, and the logits in row order (as the labeler: no_grad, one autocast context)."""
    out = np.empty((n, model.config.num_labels), dtype=np.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.bfloat16, enabled=amp is not None):
        t = time.perf_counter()
        logits = [(rows, model(**b).logits) for rows, b in batches]
        seconds = time.perf_counter() - t
    for rows, lg in logits:
        out[rows] = lg.float().numpy()
    return seconds, out


class OnnxTeacher:
    """An ONNX Runtime session called like the torch model (tensors in, ``.logits`` out), so ``forward`` times both."""

    def __init__(self, path: Path, threads: int, num_labels: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.config = SimpleNamespace(num_labels=num_labels)

    def __call__(self, **batch):
        feed = {k: v.numpy() for k, v in batch.items() if k in self.inputs}
        return SimpleNamespace(logits=torch.from_numpy(self.session.run(None, feed)[0]))


def export_onnx(folder: Path, sample: dict, out: Path) -> dict[str, Path]:
    """The teacher exported by torch.onnx in this environment, with eager attention (the graph ONNX Runtime's BERT
    fusions recognise), by both its exporters: TorchScript (``dynamo=False``, deprecated) and torch.export
    (``dynamo=True``; needs onnx and onnxscript). Dynamic batch size and sequence length."""
    import warnings

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder, attn_implementation="eager").eval()
    names = list(sample)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' notes; the logits are compared with torch's below
        torch.onnx.export(model, tuple(sample[k] for k in names), str(out / "torchscript.onnx"), dynamo=False,
                          opset_version=17, input_names=names, output_names=["logits"],
                          dynamic_axes={k: {0: "batch", 1: "seq"} for k in names} | {"logits": {0: "batch"}})
        batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("seq", min=1)
        torch.onnx.export(model, (), kwargs=sample, dynamo=True, input_names=names, output_names=["logits"],
                          dynamic_shapes={k: {0: batch, 1: seq} for k in names}).save(str(out / "dynamo.onnx"))
    return {"onnxruntime-torchscript": out / "torchscript.onnx", "onnxruntime-dynamo": out / "dynamo.onnx"}


def fuse_onnx(path: Path, config, out: Path) -> Path:
    """ONNX Runtime's BERT fusions of an exported model (once, untimed), saved beside the other outputs."""
    from onnxruntime.transformers.optimizer import optimize_model

    fused = optimize_model(str(path), model_type="bert", num_heads=config.num_attention_heads,
                           hidden_size=config.hidden_size)
    print("onnxruntime fusions:", {k: v for k, v in fused.get_fused_operator_statistics().items() if v}, flush=True)
    fused.save_model_to_file(str(out / f"{path.stem}-fused.onnx"))
    return out / f"{path.stem}-fused.onnx"


def agreement(logits: np.ndarray, ref: np.ndarray) -> dict:
    diff = np.abs(logits - ref)
    return {"classes_agree": float((logits.argmax(1) == ref.argmax(1)).mean()),
            "p99_abs_diff": float(np.quantile(diff, 0.99)), "max_abs_diff": float(diff.max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, required=True, help="a sequence-classification folder")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-levers")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--tokens", type=int, nargs="*", default=[2048, 8192, 16384], help="token budgets to try")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile(dynamic=True)")
    ap.add_argument("--onnx", type=Path, help="the same teacher exported to ONNX: also time ONNX Runtime (fp32)")
    ap.add_argument("--onnx-export", action="store_true",
                    help="export the teacher here with torch.onnx's two exporters and time ONNX Runtime on each (fp32)")
    ap.add_argument("--pairs", type=int, default=None, help="only the first N test pairs (default: all 6,165)")
    ap.add_argument("--only", nargs="*", help="time only these variants (fp32 always runs once: the reference)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(args.teacher)
    store = Store(fresh_store(args.out, args.data / "wikiqa" / "WikiQA-test.tsv.gz", "store-texts"))
    table = store.read_corpus_part(store.corpus("test").parts[0])
    table = table.slice(0, args.pairs) if args.pairs else table
    a, b = table.column("text_a").to_pylist(), table.column("text_b").to_pylist()
    enc = encode_pairs(tok, a, b, 128, "longest_first")
    n, pad_id = len(a), tok.pad_token_id

    fp32 = load_scoring_model(args.teacher).eval()
    bf16 = load_scoring_model(args.teacher).eval().to(torch.bfloat16)
    base_batches = batches_for(enc, pad_id, 4096)
    padded = sum(int(bt["input_ids"].numel()) for _, bt in base_batches)
    real = int(enc.lengths.sum())

    # name -> (model, batches, autocast dtype, the baseline it is measured against)
    first_token = copy.deepcopy(fp32)
    wrap_last_layer(first_token)
    variants = {"fp32": (fp32, base_batches, None, None),
                "bf16-autocast": (fp32, base_batches, torch.bfloat16, None),
                "bf16-weights": (bf16, base_batches, None, "bf16-autocast"),
                "fp32-first-token": (first_token, base_batches, None, "fp32"),
                "bf16-autocast-first-token": (first_token, base_batches, torch.bfloat16, "bf16-autocast")}
    for t in args.tokens:
        if args.only and not {f"fp32-tokens-{t}", f"bf16-autocast-tokens-{t}"} & set(args.only):
            continue
        tb = batches_for(enc, pad_id, t)
        variants[f"fp32-tokens-{t}"] = (fp32, tb, None, "fp32")
        variants[f"bf16-autocast-tokens-{t}"] = (fp32, tb, torch.bfloat16, "bf16-autocast")
    if args.compile:
        for name, model, amp, base in (("fp32-compile", fp32, None, "fp32"),
                                       ("bf16-autocast-compile", fp32, torch.bfloat16, "bf16-autocast"),
                                       ("bf16-weights-compile", bf16, None, "bf16-weights")):
            if args.only and name not in args.only:
                continue
            compiled = torch.compile(model, dynamic=True)
            t0 = time.perf_counter()
            forward(compiled, base_batches, amp, n)  # compiles
            print(f"{name}: compiled in {time.perf_counter() - t0:.1f}s", flush=True)
            variants[name] = (compiled, base_batches, amp, base)

    onnx: dict[str, Path] = {}  # variant -> graph, all run by ONNX Runtime in fp32 on the same batches
    if args.onnx:
        onnx = {"onnxruntime": args.onnx, "onnxruntime-fused": fuse_onnx(args.onnx, fp32.config, args.out)}
    if args.onnx_export:
        onnx |= export_onnx(args.teacher, base_batches[0][1], args.out)
        onnx["onnxruntime-torchscript-fused"] = fuse_onnx(onnx["onnxruntime-torchscript"], fp32.config, args.out)
    for name, path in onnx.items():
        session = OnnxTeacher(path, torch.get_num_threads(), fp32.config.num_labels)
        variants[name] = (session, base_batches, None, "fp32")

    names = [k for k in variants if not args.only or k in args.only]
    if "fp32" not in names:  # the reference the others' logits are compared with: scored once, not timed
        logits_fp32 = forward(fp32, base_batches, None, n)[1]
    for name in names:  # warm-up: oneDNN makes its kernels for every shape
        model, batches, amp, _ = variants[name]
        forward(model, batches, amp, n)
    seconds: dict[str, list[float]] = {k: [] for k in names}
    logits: dict[str, np.ndarray] = {} if "fp32" in names else {"fp32": logits_fp32}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            model, batches, amp, _ = variants[name]
            s, logits[name] = forward(model, batches, amp, n)
            seconds[name].append(s)
        print(f"round {r + 1}: " + ", ".join(f"{k} {seconds[k][-1]:.2f}s" for k in names), flush=True)

    results = {"pairs": n, "threads": torch.get_num_threads(), "rounds": args.rounds,
               "padded_positions_share_at_4096": 1 - real / padded, "variants": {}}
    for name in names:
        base = variants[name][3]
        row = {"seconds": seconds[name], "pairs_per_s": n / float(np.median(seconds[name])),
               **agreement(logits[name], logits["fp32"])}
        if base is not None and base in names:
            row["against"] = base
            row["speedup_median"] = float(np.median(np.array(seconds[base]) / np.array(seconds[name])))
        results["variants"][name] = row
        print(f"{name:28s} {row['pairs_per_s']:7.1f} pairs/s"
              + (f"  {row['speedup_median']:.3f}x vs {base}" if "against" in row else "")
              + f"  classes agree {row['classes_agree']:.4f}  max|diff| {row['max_abs_diff']:.4f}", flush=True)
    print(f"padded positions at 4,096 tokens per batch: {results['padded_positions_share_at_4096']:.2%} "
          "(the most padding-free attention could save)")
    (args.out / "levers.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'levers.json'}")


if __name__ == "__main__":
    main()
