"""The encoder's last layer computed for the first token only: the one position a classification head reads.

A sequence-classification head reads the last layer at one position, the first ([CLS], ``<s>``); every other
position of that layer is computed and thrown away. The first token still attends to every token, so the last
layer's keys and values are needed for all of them, but its queries, attention output, feed-forward and layer
norms are needed for the first token only. On a 6-layer encoder that is about 14% of the forward's FLOPs; the
logits are the same up to float rounding (BENCHMARKS.md, section 13).

Only the architectures whose heads are known to read the first position are wrapped (``ARCHITECTURES``), and only
in eval mode. ``LoadedTeacher`` also checks each part: before it scores one, it compares the logits with the full
forward's on that part's longest and shortest rows, and scores with the full forward if they differ.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

# Heads that read the last layer at position 0 only (the pooler, or ``features[:, 0, :]``), with BERT's layer layout
ARCHITECTURES = (
    "BertForSequenceClassification",
    "RobertaForSequenceClassification",
    "XLMRobertaForSequenceClassification",
    "ElectraForSequenceClassification",
)
ATTENTIONS = ("sdpa", "eager")  # the 4-D masks these get can be sliced to the first query row


class FirstTokenLayer(nn.Module):
    """Wraps the encoder's last layer; returns its output at the first position only, [batch, 1, hidden]."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer
        self.enabled = True
        self.train(layer.training)

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        if not self.enabled or self.training:
            return self.layer(hidden_states, attention_mask, *args, **kwargs)
        attention = self.layer.attention
        sa = attention.self
        batch, length, _ = hidden_states.shape
        heads, size = sa.num_attention_heads, sa.attention_head_size
        first = hidden_states[:, :1]
        query = sa.query(first).view(batch, 1, heads, size).transpose(1, 2)
        key = sa.key(hidden_states).view(batch, length, heads, size).transpose(1, 2)
        value = sa.value(hidden_states).view(batch, length, heads, size).transpose(1, 2)
        # One query row, written out rather than through SDPA: the CPU's SDPA splits a single query's keys across
        # threads, so its result would change with the thread count, and a store's labels would with it
        scores = torch.matmul(query, key.transpose(-1, -2)) * sa.scaling  # [batch, heads, 1, length]
        if attention_mask is not None:
            mask = attention_mask[:, :, :1, :]  # sdpa: True where a key may be seen; eager: 0 or a large negative
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        context = torch.matmul(scores.softmax(-1), value).transpose(1, 2).reshape(batch, 1, heads * size)
        return self.layer.feed_forward_chunk(attention.output(context, first))

    @contextmanager
    def full(self):
        """The full last layer for the duration (to check this one against it)."""
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True


def wrap_last_layer(model: nn.Module) -> FirstTokenLayer | None:
    """Wrap ``model``'s last encoder layer in place and return the wrapper, or None where this does not apply."""
    config = model.config
    if type(model).__name__ not in ARCHITECTURES or config.is_decoder or getattr(config, "add_cross_attention", False):
        return None
    if getattr(config, "_attn_implementation", None) not in ATTENTIONS:
        return None
    layers = getattr(getattr(model.base_model, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        return None
    last = layers[-1]
    if isinstance(last, FirstTokenLayer):
        return last
    sa = getattr(getattr(last, "attention", None), "self", None)
    needed = ("query", "key", "value", "num_attention_heads", "attention_head_size", "scaling")
    if sa is None or not all(hasattr(sa, a) for a in needed) or not hasattr(last, "feed_forward_chunk"):
        return None
    layers[-1] = FirstTokenLayer(last)
    return layers[-1]


def max_difference(model: nn.Module, wrapper: FirstTokenLayer, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Largest |logit difference| between this layer and the full one on ``batch``, and the largest |logit| of the
    full one (the scale a relative tolerance needs); one host sync."""
    first = model(**batch).logits.float()
    with wrapper.full():
        full = model(**batch).logits.float()
    return float((first - full).abs().max()), float(full.abs().max())
