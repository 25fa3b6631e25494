"""The multi-head student: a stock sequence-classification model whose last linear layer
produces H x C logits (one head per teacher), and its export back to a stock model.

The heads share the encoder and the pooled vector ``h``; head k computes ``W_k h + b_k``.
The prediction is the mean of the heads, ``mean_k(W_k h + b_k) = mean_k(W_k) h + mean_k(b_k)``,
so folding the heads into one ``Linear(hidden, C)`` with the mean weights and bias gives a
stock ``AutoModelForSequenceClassification`` with exactly the multi-head prediction.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

HEAD_HINTS = ("classifier", "score", "out_proj")


def find_head(model: nn.Module, num_labels: int) -> str:
    """Name of the final classification nn.Linear (``classifier``, ``classifier.out_proj``, ``score``...)."""
    found = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.out_features == num_labels and any(h in name for h in HEAD_HINTS)
    ]
    if not found:
        raise ValueError(f"{type(model).__name__}: no classification Linear with {num_labels} outputs found")
    return found[-1]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


class MultiHeadStudent(nn.Module):
    """Wraps a HF sequence-classification model; ``forward`` returns logits [B, heads, C]."""

    def __init__(self, hf_model: nn.Module, num_heads: int):
        super().__init__()
        self.hf = hf_model
        self.num_labels = hf_model.config.num_labels
        self.num_heads = num_heads
        self.head_name = find_head(hf_model, self.num_labels)
        old: nn.Linear = hf_model.get_submodule(self.head_name)
        new = nn.Linear(old.in_features, num_heads * self.num_labels, bias=old.bias is not None)
        with torch.no_grad():
            # head k starts from the loaded/initialised head plus a small seeded perturbation,
            # so the heads are not clones (they follow different teachers anyway)
            w = old.weight.detach().repeat(num_heads, 1)
            std = float(getattr(hf_model.config, "initializer_range", 0.02))
            gen = torch.Generator().manual_seed(1234)
            if num_heads > 1:
                w = w + torch.randn(w.shape, generator=gen) * std
            new.weight.copy_(w)
            if old.bias is not None:
                new.bias.copy_(old.bias.detach().repeat(num_heads))
        _set_module(hf_model, self.head_name, new)
        import inspect

        # a tokenizer may return token_type_ids a model does not take (e.g. MPNet): drop them then
        self.takes_token_types = "token_type_ids" in inspect.signature(hf_model.forward).parameters

    @property
    def config(self):
        return self.hf.config

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.takes_token_types:
            kw["token_type_ids"] = token_type_ids
        logits = self.hf(**kw).logits
        return logits.view(logits.shape[0], self.num_heads, self.num_labels)

    def folded(self) -> nn.Module:
        """A deep copy of the HF model with the heads folded into one Linear(hidden, C)."""
        hf = copy.deepcopy(self.hf).cpu()
        lin: nn.Linear = hf.get_submodule(self.head_name)
        c, h = self.num_labels, self.num_heads
        out = nn.Linear(lin.in_features, c, bias=lin.bias is not None)
        with torch.no_grad():
            out.weight.copy_(lin.weight.detach().float().view(h, c, -1).mean(dim=0))
            if lin.bias is not None:
                out.bias.copy_(lin.bias.detach().float().view(h, c).mean(dim=0))
        _set_module(hf, self.head_name, out)
        return hf


def load_student(encoder: str, num_labels: int, num_heads: int, num_layers: int = 0, label_names=None,
                 layers: list[int] | None = None):
    """Load the encoder as a sequence classifier with C labels, optionally truncated to its first N layers,
    or cut to the given ``layers`` (e.g. [0, 2, 4]: every other layer of a 6-layer encoder)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    kw = {"num_labels": num_labels}
    if label_names:
        kw["id2label"] = dict(enumerate(label_names))
        kw["label2id"] = {n: i for i, n in enumerate(label_names)}
    config = AutoConfig.from_pretrained(encoder, **kw)
    if layers:
        have = getattr(config, "num_hidden_layers", 0)
        if max(layers) >= have:
            raise ValueError(f"{encoder}: layers={layers} but the encoder has only {have} layers (0..{have - 1})")
        num_layers = max(layers) + 1  # load what the cut needs, then keep the chosen ones
    if num_layers:
        have = getattr(config, "num_hidden_layers", None)
        if have is None:
            raise ValueError(f"{encoder}: its config has no num_hidden_layers; cannot keep the first {num_layers}")
        if num_layers > have:
            raise ValueError(f"{encoder}: num_layers={num_layers} but the encoder has only {have} layers")
        config.num_hidden_layers = num_layers
    from transformers.utils import logging as hf_logging

    # Dropped layers ("unexpected") and the new head ("missing") are what we asked for: no load report.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        hf = AutoModelForSequenceClassification.from_pretrained(encoder, config=config)
    finally:
        hf_logging.set_verbosity(level)
    if layers:
        keep_layers(hf, layers)
    return MultiHeadStudent(hf, num_heads)


def keep_layers(hf: nn.Module, layers: list[int]) -> None:
    """Keep only the encoder layers ``layers`` (in that order): the model's one ModuleList of
    ``num_hidden_layers`` blocks is replaced, and the config says the new depth, so the export is a stock
    model of that depth."""
    n = hf.config.num_hidden_layers
    stacks = [(name, m) for name, m in hf.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n
              and name.rsplit(".", 1)[-1] in ("layer", "layers")]
    if len(stacks) != 1:
        raise ValueError(f"{type(hf).__name__}: cannot find its encoder layers to keep {layers}")
    name, stack = stacks[0]
    _set_module(hf, name, nn.ModuleList([stack[i] for i in layers]))
    hf.config.num_hidden_layers = len(layers)


def export(student: MultiHeadStudent, tokenizer, path: str | Path) -> Path:
    """Save the folded stock model (safetensors) and its tokenizer into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = student.folded()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
