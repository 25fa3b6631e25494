"""Streaming corpus parts zipped with their teachers' label parts, for the student.

Order of one epoch, fully determined by (seed, epoch, world size, workers)::

    parts of all the stage's corpora --seeded shuffle (seed, epoch)--> rank r takes parts r::world
      --> DataLoader worker w of that rank takes parts w::num_workers
      --> each part is read with Store.read_aligned (ids checked, stale/missing labels refused)
      --> rows pass a bounded shuffle buffer (vectorised: permute the buffer, emit pools)
      --> a pool of `bucket_batches` batches' rows is tokenized (in the worker, if any), sorted by length,
          cut into batches, and the batch order shuffled  --> padded tensors

Memory per worker is bounded by two parts (the one being read, and the next, read ahead in a
thread so an object store's latency hides behind training) plus the shuffle buffer, whatever the
corpus size.

A stage with a listwise loss streams *grouped*: the rows of one group (question) stay together. Each
part's groups are put in a seeded order and their rows cut into batches in that order (carried from
part to part, so the count is still ceil(rows / batch_size)); a group that a cut falls in is split into
two lists (more, if it is longer than a batch, or if its rows lie in several parts). The shuffle buffer is not used then: rows mix by the parts' order and each part's group order.

A resumed run seeks: ``set_epoch(epoch, skip)`` starts the stream at the rank's batch ``skip``.
The buffer's shuffles depend only on row counts, so the stream replays them on index arrays
(no reading, no tokenizing) up to the position, then reads only the rows still ahead of it.

Every row is yielded exactly once per epoch across ranks and workers. A worker with n rows
yields exactly ceil(n / batch_size) batches (pools are whole batches; only its last one may be
short), so ``plan_batches`` knows from the manifests alone how many batches each rank gets.
Ranks can differ by a few batches; the trainer runs every rank for the largest count and
pads the shorter ones with zero-weight batches (a forward/backward that contributes nothing),
so DDP's collective calls always match and no real row is dropped or repeated.
"""
from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from tmkd.data.store import CorpusPart, Store, TeacherRecord
from tmkd.teachers.scoring import Encoded, encode_pairs, pad_batch

TEXT_COLUMNS = ["text_a", "text_b", "label", "group"]
INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # the model's inputs in a batch


def data_workers(requested: int, device) -> int:
    """DataLoader workers per process: ``requested``, or for -1 (auto) 0 on a CPU and 2 on a GPU.

    On a CPU the training step already uses every core; a worker process tokenizing beside it
    preempts one of the step's threads, and the step waits for its slowest thread. Measured on a
    2-core machine (BENCHMARKS.md, section 6): step time streaming over in-memory 1.10 with one
    worker, 1.00 with none (the data path costs ~2.5 ms of a ~190 ms step). On a GPU the worker's
    tokenizing overlaps the device's work. 0 and 1 workers give the same data order.
    """
    if requested >= 0:
        return requested
    return 0 if getattr(device, "type", str(device)) == "cpu" else 2


# ---- the plan: which parts go where -----------------------------------------------------------
def epoch_order(parts: list[CorpusPart], seed: int, epoch: int) -> list[CorpusPart]:
    """All parts in this epoch's seeded order (the same on every rank)."""
    ordered = sorted(parts, key=lambda p: (p.corpus, p.part))
    perm = np.random.default_rng([seed, epoch, 7919]).permutation(len(ordered))
    return [ordered[i] for i in perm]


def assign(parts: list[CorpusPart], seed: int, epoch: int, rank: int, world: int, worker: int, workers: int):
    return epoch_order(parts, seed, epoch)[rank::world][worker::max(1, workers)]


def plan_batches(parts, seed: int, epoch: int, world: int, workers: int, batch_size: int) -> list[int]:
    """Number of batches each rank's stream yields in this epoch (from manifest row counts)."""
    out = []
    for r in range(world):
        n = 0
        for w in range(max(1, workers)):
            rows = sum(p.rows for p in assign(parts, seed, epoch, r, world, w, workers))
            n += math.ceil(rows / batch_size)
        out.append(n)
    return out


def turn_start(counts: list[int], skip: int) -> tuple[list[int], int]:
    """Where a rank's stream at batch ``skip`` stands in its DataLoader workers' turns.

    The DataLoader takes one batch from each worker in turn (passing over those that are done),
    and a new DataLoader starts its turns at worker 0. So a resumed stream starts each worker at
    the start of the current turn, ``(batches each worker has yielded by then)``, and the caller
    drops the ``discard`` batches of that turn already trained (fewer than the workers)."""
    counts = np.asarray(counts, dtype=np.int64)
    lo, hi = 0, int(counts.max(initial=0))  # the most whole turns that fit in skip (binary search)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if np.minimum(counts, mid).sum() <= skip else (lo, mid - 1)
    done = np.minimum(counts, lo)
    return done.tolist(), skip - int(done.sum())


# ---- tokenization and batching (the labeler's vectorised code: flat token arrays, numpy padding) --
def encode(tokenizer, text_a: np.ndarray, text_b: np.ndarray, max_length: int) -> Encoded:
    return encode_pairs(tokenizer, text_a.tolist(), text_b.tolist(), max_length, "longest_first")


def collate(enc: Encoded, idx: np.ndarray, pad_id: int, labels, logits, ids, groups=None) -> dict:
    """A batch: tensors for the model and the loss; ``weight`` (1.0, or 0.0 for a padding batch) and
    ``id_sum`` (the rows' ids, summed mod 2^64, for the resume check) as plain Python numbers, so the
    loop reads them without a host sync once the tensors are on a GPU. With ``groups`` (a grouped
    stream): ``group_index`` (0..G-1 per row), ``num_groups`` and ``num_lists`` (groups of 2+ rows)."""
    batch = pad_batch(enc, idx, pad_id)
    if groups is not None:
        _, index, sizes = np.unique(groups[idx], return_inverse=True, return_counts=True)
        batch["group_index"] = torch.from_numpy(index.reshape(-1).astype(np.int64))
        batch["num_groups"], batch["num_lists"] = len(sizes), int((sizes > 1).sum())
    batch["labels"] = torch.from_numpy(labels[idx].astype(np.int64))
    batch["teacher_logits"] = torch.from_numpy(np.ascontiguousarray(logits[idx], dtype=np.float32))
    batch["ids"] = torch.from_numpy(ids[idx].astype(np.int64))
    batch["id_sum"] = int(ids[idx].astype(np.int64).sum()) % (1 << 64)
    batch["weight"] = 1.0
    return batch


def dummy_batch(tokenizer, num_teachers: int, num_labels: int) -> dict[str, torch.Tensor]:
    """A one-row batch of weight 0: keeps a rank that ran out of data in step with the others."""
    enc = encode(tokenizer, np.array(["."], dtype=object), np.array(["."], dtype=object), 8)
    idx = np.zeros(1, dtype=np.int64)
    b = collate(enc, idx, tokenizer.pad_token_id or 0, np.full(1, -1), np.zeros((1, num_teachers, num_labels)),
                np.full(1, -1), np.array(["."], dtype=object))
    b["weight"] = 0.0
    return b


@dataclass
class _Rows:
    ids: np.ndarray
    text_a: np.ndarray
    text_b: np.ndarray
    labels: np.ndarray
    logits: np.ndarray
    groups: np.ndarray  # str per row; a row without a group has a name of its own ("\0" + its id)

    def __len__(self):
        return len(self.ids)

    @staticmethod
    def empty(num_teachers: int, num_labels: int) -> "_Rows":
        text = np.empty(0, dtype=object)
        return _Rows(np.empty(0, np.int64), text, text, np.empty(0, np.int64),
                     np.empty((0, num_teachers, num_labels), np.float32), text)

    def take(self, idx) -> "_Rows":
        return _Rows(self.ids[idx], self.text_a[idx], self.text_b[idx], self.labels[idx], self.logits[idx],
                     self.groups[idx])

    @staticmethod
    def concat(chunks: list["_Rows"]) -> "_Rows":
        return _Rows(*(np.concatenate([getattr(c, f) for c in chunks]) for f in
                       ("ids", "text_a", "text_b", "labels", "logits", "groups")))


def read_rows(store: Store, part: CorpusPart, teachers: list[TeacherRecord], num_labels: int) -> _Rows:
    table, logits = store.read_aligned(part, teachers, columns=TEXT_COLUMNS)
    if not teachers:
        logits = np.zeros((table.num_rows, 0, num_labels), np.float32)
    elif logits.shape[2] != num_labels:
        raise ValueError(f"{part.path}: teachers give {logits.shape[2]} logits per row, the student has {num_labels}")
    import pyarrow.compute as pc

    ids = table.column("id")
    own = pc.binary_join_element_wise("\0", pc.cast(ids, "string"), "")  # a group of its own per ungrouped row
    return _Rows(
        ids.to_numpy(),
        table.column("text_a").to_numpy(zero_copy_only=False),
        table.column("text_b").to_numpy(zero_copy_only=False),
        table.column("label").fill_null(-1).to_numpy().astype(np.int64),
        logits,
        pc.coalesce(table.column("group"), own).to_numpy(zero_copy_only=False),
    )


def group_order(groups: np.ndarray, rng) -> np.ndarray:
    """Row order that keeps each group's rows together (in their order), the groups in a seeded order."""
    _, index = np.unique(groups, return_inverse=True)
    index = index.reshape(-1)
    rank = np.empty(int(index.max(initial=-1)) + 1, np.int64)
    rank[rng.permutation(len(rank))] = np.arange(len(rank))
    return np.argsort(rank[index], kind="stable")


def epoch_batches(stream: "DistillStream", epoch: int, skip: int = 0):
    """The rank's batches of ``epoch`` from batch ``skip`` on, tokenized in ``stream.num_workers``
    DataLoader workers (none: in this process)."""
    from torch.utils.data import DataLoader

    stream.set_epoch(epoch, skip)
    loader = DataLoader(stream, batch_size=None, num_workers=stream.num_workers, persistent_workers=False,
                        generator=torch.Generator().manual_seed(stream.seed))
    batches = iter(loader)
    for _ in range(stream.turn_start()[1]):  # the current turn's batches trained before the checkpoint
        next(batches)
    return batches


class DistillStream(IterableDataset):
    """Batches for one rank; use with ``DataLoader(ds, batch_size=None, num_workers=W)``."""

    def __init__(
        self,
        store_root: str,
        parts: list[CorpusPart],
        teachers: list[TeacherRecord],
        tokenizer_path: str,
        *,
        num_labels: int,
        batch_size: int,
        max_length: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 10000,
        bucket_batches: int = 50,
        grouped: bool = False,
    ):
        self.store_root, self.parts, self.teachers = store_root, list(parts), list(teachers)
        self.tokenizer_path, self.num_labels = tokenizer_path, num_labels
        self.batch_size, self.max_length, self.seed = batch_size, max_length, seed
        self.rank, self.world, self.num_workers = rank, world, num_workers
        self.pool_rows = bucket_batches * batch_size
        self.buffer_rows = max(shuffle_buffer, self.pool_rows)
        self.grouped = grouped
        self.epoch, self.skip = 0, 0
        self._tok = None

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Stream epoch ``epoch`` from this rank's batch ``skip`` on (a resumed run's position)."""
        self.epoch, self.skip = epoch, skip

    def turn_start(self) -> tuple[list[int], int]:
        """(batches each worker skips, batches the caller drops) for this epoch: see ``turn_start``. A skip
        past this rank's batches (its zero-weight filler tail) is all of them."""
        workers = max(1, self.num_workers)
        counts = [math.ceil(sum(p.rows for p in assign(self.parts, self.seed, self.epoch, self.rank, self.world, w,
                                                        workers)) / self.batch_size) for w in range(workers)]
        return turn_start(counts, min(self.skip, sum(counts)))

    def planned_batches(self) -> int:
        return plan_batches(self.parts, self.seed, self.epoch, self.world, self.num_workers, self.batch_size)[self.rank]

    @property
    def tokenizer(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.tokenizer_path)
        return self._tok

    def _pools(self, parts: list[CorpusPart], rng, skip: int = 0):
        """(pool rows, batch order) in the epoch's order, from batch ``skip`` of this worker's stream on.

        The shuffle buffer is driven by the parts' row counts alone: ``order`` holds the buffer's rows
        as positions in the concatenation of ``parts``, and the seeded permutations depend only on
        lengths. So a resumed stream replays the bookkeeping (index arrays, no I/O) up to its
        position, then reads only the rows still ahead of it: the parts they lie in, once each.
        Until then ``rows`` is None; after, it holds the buffer's rows in the order of ``order``.
        """
        store = Store(self.store_root)
        offsets = np.cumsum([0] + [p.rows for p in parts])
        order = np.empty(0, np.int64)
        rows: _Rows | None = None if skip else _Rows.empty(len(self.teachers), self.num_labels)
        reader = ThreadPoolExecutor(1, thread_name_prefix="tmkd-read-ahead")
        ahead: dict[int, Future] = {}

        def read(j: int) -> _Rows:
            """Part j's rows; part j + 1 is fetched meanwhile (an object store's latency hides behind the
            training of part j's pools)."""
            for k in (j, j + 1):
                if k < len(parts) and k not in ahead:
                    ahead[k] = reader.submit(read_rows, store, parts[k], self.teachers, self.num_labels)
            return ahead.pop(j).result()

        def emit(start: int, end: int):
            nonlocal skip, rows
            batch_order = rng.permutation(math.ceil((end - start) / self.batch_size))
            if skip >= len(batch_order):  # wholly before the position: bookkeeping only
                skip -= len(batch_order)
                return None
            if rows is None:  # the position is in this pool: read the rows still ahead, once
                rows = self._gather(store, parts, offsets, order)
            pool, drop, skip = rows.take(slice(start, end)), skip, 0
            return pool, batch_order[drop:]

        try:
            for j in range(len(parts)):
                order = np.concatenate([order, np.arange(offsets[j], offsets[j + 1])])
                if rows is not None:
                    rows = _Rows.concat([rows, read(j)])
                if len(order) >= self.buffer_rows:
                    perm = rng.permutation(len(order))
                    order, rows = order[perm], rows.take(perm) if rows is not None else None
                    start = 0
                    while len(order) - start >= self.buffer_rows:
                        if (out := emit(start, start + self.pool_rows)) is not None:
                            yield out
                        start += self.pool_rows
                    order, rows = order[start:], rows.take(slice(start, None)) if rows is not None else None
            if len(order):
                perm = rng.permutation(len(order))
                order, rows = order[perm], rows.take(perm) if rows is not None else None
                for start in range(0, len(order), self.pool_rows):
                    if (out := emit(start, min(start + self.pool_rows, len(order)))) is not None:
                        yield out
        finally:  # also when the consumer stops early
            reader.shutdown(wait=False, cancel_futures=True)

    def _gather(self, store: Store, parts: list[CorpusPart], offsets: np.ndarray, order: np.ndarray) -> _Rows:
        """The rows at positions ``order`` (into the concatenation of ``parts``), in that order; each part
        that holds one is read once, and only its wanted rows are kept."""
        which = np.searchsorted(offsets, order, side="right") - 1
        chunks, placed = [], []
        for j in np.unique(which):
            at = np.flatnonzero(which == j)
            chunks.append(read_rows(store, parts[j], self.teachers, self.num_labels).take(order[at] - offsets[j]))
            placed.append(at)
        if not chunks:
            return _Rows.empty(len(self.teachers), self.num_labels)
        return _Rows.concat(chunks).take(np.argsort(np.concatenate(placed), kind="stable"))

    def _grouped_batches(self, parts: list[CorpusPart], rng, skip: int = 0):
        """A grouped stream (see the module docstring), from batch ``skip`` on: the parts before the
        position are read for their groups (their seeded order), not tokenized."""
        store, tok = Store(self.store_root), self.tokenizer

        def cuts():
            carry = _Rows.empty(len(self.teachers), self.num_labels)
            for part in parts:
                rows = read_rows(store, part, self.teachers, self.num_labels)
                rows = _Rows.concat([carry, rows.take(group_order(rows.groups, rng))])
                full = len(rows) // self.batch_size * self.batch_size
                for start in range(0, full, self.batch_size):
                    yield rows.take(slice(start, start + self.batch_size))
                carry = rows.take(slice(full, None))
            if len(carry):
                yield carry

        for i, rows in enumerate(cuts()):
            if i >= skip:
                enc = encode(tok, rows.text_a, rows.text_b, self.max_length)
                yield collate(enc, np.arange(len(rows)), tok.pad_token_id or 0, rows.labels, rows.logits, rows.ids,
                              rows.groups)

    def _batches(self, pool: _Rows, batch_order: np.ndarray):
        tok = self.tokenizer
        enc = encode(tok, pool.text_a, pool.text_b, self.max_length)
        order = np.argsort(enc.lengths, kind="stable")
        cuts = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for j in batch_order:
            yield collate(enc, cuts[j], tok.pad_token_id or 0, pool.labels, pool.logits, pool.ids)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None and workers != max(1, self.num_workers):
            raise RuntimeError(f"DistillStream planned for {self.num_workers} workers, DataLoader has {workers}")
        parts = assign(self.parts, self.seed, self.epoch, self.rank, self.world, worker, workers)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker])
        if self.grouped:
            yield from self._grouped_batches(parts, rng, self.turn_start()[0][worker])
            return
        for pool, batch_order in self._pools(parts, rng, self.turn_start()[0][worker]):
            yield from self._batches(pool, batch_order)


# ---- evaluation -------------------------------------------------------------------------------
def eval_batches(store: Store, parts: list[CorpusPart], tokenizer, max_length: int, batch_size: int):
    """(batch, gold labels, groups) over the given parts, in length-sorted batches, no shuffling."""
    for part in parts:
        table = store.read_corpus_part(part, ["id", "text_a", "text_b", "label", "group"])
        a = table.column("text_a").to_numpy(zero_copy_only=False)
        b = table.column("text_b").to_numpy(zero_copy_only=False)
        labels = table.column("label").fill_null(-1).to_numpy().astype(np.int64)
        groups = np.array(table.column("group").to_pylist(), dtype=object)
        ids = table.column("id").to_numpy()
        enc = encode(tokenizer, a, b, max_length)
        order = np.argsort(enc.lengths, kind="stable")
        dummy_logits = np.zeros((len(a), 0, 0), np.float32)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            batch = collate(enc, idx, tokenizer.pad_token_id or 0, labels, dummy_logits, ids)
            yield batch, labels[idx], list(groups[idx])
