"""The labelled rows a teacher is fine-tuned on, and how they are cut into batches.

A split is one corpus's labelled rows (unlabeled rows are counted, not used). Pointwise
losses take batches of rows of similar length; the ranking losses take batches of whole
groups (a question's candidates), since a listwise softmax needs them all together.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tmkd.data.store import Store, StoreError


class FinetuneError(StoreError):
    """A user-facing problem with the fine-tuning config or its data: reported in one line, no traceback."""


@dataclass
class Split:
    """The labelled rows of one corpus, as the model sees them."""

    corpus: str
    text_a: list[str]
    text_b: list[str]
    labels: np.ndarray  # int64
    groups: list  # group id per row, or None
    label_names: list[str]
    skipped_unlabeled: int = 0
    manifest: object = None  # the corpus manifest the rows were read from (its parts and digests, for model cards)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def has_groups(self) -> bool:
        return any(g is not None for g in self.groups)


def load_split(store: Store, corpus: str, limit: int | None = None, seed: int = 0) -> Split:
    """Read every part of a corpus; keep labelled rows; optionally subsample whole groups."""
    manifest = store.corpus(corpus)
    if not manifest.label_names:
        raise FinetuneError(f"corpus {corpus!r} has no label names: a teacher is trained on a labelled corpus")
    text_a, text_b, labels, groups = [], [], [], []
    for part in manifest.parts:
        t = store.read_corpus_part(part, columns=["text_a", "text_b", "label", "group"]).to_pydict()
        text_a += t["text_a"]
        text_b += t["text_b"]
        labels += t["label"]
        groups += t["group"]
    keep = [i for i, y in enumerate(labels) if y is not None]
    if not keep:
        raise FinetuneError(f"corpus {corpus!r} has no labelled rows")
    if limit is not None and limit < len(keep):
        keep = _subsample(keep, [groups[i] for i in keep], limit, seed)
    return Split(
        corpus, [text_a[i] for i in keep], [text_b[i] for i in keep], np.array([labels[i] for i in keep], np.int64),
        [groups[i] for i in keep], list(manifest.label_names), len(labels) - sum(y is not None for y in labels),
        manifest,
    )


def _subsample(rows: list[int], groups: list, limit: int, seed: int) -> list[int]:
    """About ``limit`` rows, keeping whole groups so that ranking metrics stay meaningful."""
    rng = np.random.default_rng(seed)
    units: dict = {}
    for row, g in zip(rows, groups):
        units.setdefault(g if g is not None else ("row", row), []).append(row)
    chosen: list[int] = []
    ordered = list(units.values())
    for k in rng.permutation(len(ordered)):
        if len(chosen) >= limit:
            break
        chosen += ordered[k]
    return sorted(chosen)


def group_index(groups: list) -> tuple[np.ndarray, list[np.ndarray]]:
    """Integer group id per row (-1 = no group) and the rows of each group."""
    ids = np.full(len(groups), -1, dtype=np.int64)
    seen: dict = {}
    for i, g in enumerate(groups):
        if g is not None:
            ids[i] = seen.setdefault(g, len(seen))
    members = [[] for _ in seen]
    for i, gid in enumerate(ids):
        if gid >= 0:
            members[gid].append(i)
    return ids, [np.asarray(m, dtype=np.int64) for m in members]


def pair_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, pool: int = 50) -> list[np.ndarray]:
    """Shuffled batches of rows of similar length: shuffle, sort pools of ~50 batches by length, cut, shuffle.

    Sorting inside a pool cuts padding (~1.7x faster on CPU) while batches stay random.
    """
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size * pool):
        chunk = order[start : start + batch_size * pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def group_batches(
    members: list[np.ndarray], lengths: np.ndarray, batch_size: int, rng: np.random.Generator, pool: int = 50
) -> list[np.ndarray]:
    """Batches of whole groups (questions), up to ``batch_size`` rows each, groups of similar length together.

    A group larger than ``batch_size`` is a batch of its own: a listwise loss needs all of a
    question's candidates in one softmax.
    """
    order = rng.permutation(len(members))
    longest = np.array([lengths[m].max() for m in members]) if members else np.zeros(0)
    batches = []
    per_pool = max(1, pool * max(1, batch_size // max(1, int(np.mean([len(m) for m in members] or [1])))))
    for start in range(0, len(order), per_pool):
        chunk = order[start : start + per_pool]
        chunk = chunk[np.argsort(longest[chunk], kind="stable")]
        current: list[np.ndarray] = []
        size = 0
        for g in chunk:
            if current and size + len(members[g]) > batch_size:
                batches.append(np.concatenate(current))
                current, size = [], 0
            current.append(members[g])
            size += len(members[g])
        if current:
            batches.append(np.concatenate(current))
    return [batches[i] for i in rng.permutation(len(batches))]


def padded_tokens(rows: np.ndarray, lengths: np.ndarray) -> int:
    """Tokens a batch of these rows takes once padded to its longest row: what its activations scale with."""
    return len(rows) * int(lengths[rows].max()) if len(rows) else 0


def micro_batches(rows: np.ndarray, groups: np.ndarray, lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """Split one batch's ``rows`` into parts of at most ``budget`` padded tokens that keep each group whole.

    ``groups`` holds each row's group id (-1: none; such rows split anywhere) and ``lengths`` every row's token
    count. A group over the budget is a part of its own (the trainer splits its forward further, by rows:
    token_chunks). A step that runs its batch part by part, adding up the gradients, keeps one part's
    activations alive at a time instead of the whole batch's.
    """
    rows, groups = np.asarray(rows), np.asarray(groups)
    if padded_tokens(rows, lengths) <= budget:
        return [rows]
    key = np.arange(len(rows))  # rows of one group share the key of its first row; a row without one, its own
    grouped = np.flatnonzero(groups >= 0)
    if len(grouped):
        _, first, inverse = np.unique(groups[grouped], return_index=True, return_inverse=True)
        key[grouped] = grouped[first][inverse]
    order = np.argsort(key, kind="stable")
    rows, key = rows[order], key[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], len(rows)]
    longest = np.maximum.reduceat(lengths[rows], starts)  # per group (or lone row)
    parts, begin, width = [], 0, 0
    for start, end, top in zip(starts.tolist(), ends.tolist(), longest.tolist()):  # per group in the batch
        if start > begin and (end - begin) * max(width, top) > budget:
            parts.append(rows[begin:start])
            begin, width = start, 0
        width = max(width, top)
    parts.append(rows[begin:])
    return parts


def token_chunks(rows: np.ndarray, lengths: np.ndarray, budget: int) -> list[np.ndarray]:
    """``rows`` cut, shortest first, into chunks of at most ``budget`` padded tokens (at least one row each)."""
    rows = np.asarray(rows)[np.argsort(lengths[rows], kind="stable")]
    chunks, begin = [], 0
    for end in range(1, len(rows) + 1):  # rows of one oversized group: a few dozen at most
        if end - begin > 1 and (end - begin) * int(lengths[rows[end - 1]]) > budget:
            chunks.append(rows[begin:end - 1])
            begin = end - 1
    chunks.append(rows[begin:])
    return chunks
