"""Scoring pairs with a teacher: tokenize once, batch by length under a token budget, forward.

The hot path is vectorised: a part's token ids are kept as one flat array plus offsets,
and each padded batch is cut out of it with numpy indexing (no per-row Python loop).
Rows are sorted by length so batches carry little padding, then the logits are put back
in the part's order, so the caller never sees the sorting.
"""
from __future__ import annotations

import threading
import warnings
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, SimpleQueue

import numpy as np
import torch

from tmkd.data.store import TeacherRecord
from tmkd.teachers.device import describe, scoring_settings, to_device
from tmkd.teachers.first_token import max_difference, wrap_last_layer
from tmkd.teachers.spec import TeacherError, TeacherSpec

@dataclass
class Encoded:
    """Token ids of a list of pairs, ragged: row i is flat[offsets[i]:offsets[i+1]]."""

    input_ids: np.ndarray
    token_type_ids: np.ndarray | None
    offsets: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


def _flatten(rows: list[list[int]], total: int) -> np.ndarray:
    import itertools

    return np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=total)


def encode_pairs(tokenizer, text_a: list[str], text_b: list[str], max_length: int, truncation: str) -> Encoded:
    """Tokenize a batch of pairs in one call of the (Rust) fast tokenizer."""
    want_types = "token_type_ids" in tokenizer.model_input_names
    enc = tokenizer(
        text_a, text_b, truncation=truncation, max_length=max_length, padding=False,
        return_attention_mask=False, return_token_type_ids=want_types,
    )
    lengths = np.fromiter(map(len, enc["input_ids"]), dtype=np.int64, count=len(text_a))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    types = _flatten(enc["token_type_ids"], total) if want_types else None
    return Encoded(_flatten(enc["input_ids"], total), types, offsets)


def length_batches(lengths: np.ndarray, batch_tokens: int, max_rows: int = 512) -> list[np.ndarray]:
    """Row indices grouped into batches, longest first, each with rows × max length ≤ batch_tokens."""
    order = np.argsort(-lengths, kind="stable")
    batches, i = [], 0
    while i < len(order):
        longest = int(lengths[order[i]])
        size = max(1, min(max_rows, batch_tokens // max(longest, 1)))
        batches.append(order[i : i + size])
        i += size
    return batches


def pad_batch(enc: Encoded, rows: np.ndarray, pad_id: int) -> dict[str, torch.Tensor]:
    """Cut a padded batch for ``rows`` out of the flat token arrays (vectorised)."""
    starts = enc.offsets[rows]
    lens = enc.offsets[rows + 1] - starts
    width = int(lens.max())
    cols = np.arange(width)
    mask = cols[None, :] < lens[:, None]
    index = np.where(mask, starts[:, None] + cols[None, :], 0)
    batch = {
        "input_ids": torch.from_numpy(np.where(mask, enc.input_ids[index], pad_id)),
        "attention_mask": torch.from_numpy(mask.astype(np.int64)),
    }
    if enc.token_type_ids is not None:
        batch["token_type_ids"] = torch.from_numpy(np.where(mask, enc.token_type_ids[index], 0))
    return batch


def check_compiler(spec: TeacherSpec) -> None:
    """torch.compile builds C/C++ at the first forward (its CPU kernels; Triton's launchers on a GPU): say so up
    front if there is no compiler, rather than fail with a traceback in the middle of scoring."""
    import shutil

    try:
        from torch._inductor import cpp_builder

        cxx = cpp_builder.get_cpp_compiler()
    except Exception:  # noqa: BLE001 - any failure here means: no usable compiler
        cxx = None
    if not cxx or not shutil.which(cxx):
        raise TeacherError(f"teacher {spec.name!r}: compile = true needs a C++ compiler (g++ or clang++) on this "
                           "machine for torch.compile; install one or set compile = false")


def load_scoring_model(folder: Path, attention: str = "sdpa"):
    """The sequence-classification model in ``folder`` (safetensors when it has them), with fused attention when
    its architecture offers it (else transformers' default)."""
    from transformers import AutoModelForSequenceClassification

    use_st = any(folder.glob("*.safetensors")) or None
    try:
        return AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=use_st,
                                                                  attn_implementation=attention)
    except (ValueError, ImportError):  # this architecture has no such attention implementation
        return AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=use_st)


class LoadedTeacher:
    """A teacher model ready to score: weights on the device, eval mode, and the settings the device calls for
    (compute dtype, tokens and rows per batch: tmkd.teachers.device)."""

    def __init__(self, spec: TeacherSpec, record: TeacherRecord, folder: Path, device: torch.device, tokenizer):
        self.spec, self.record, self.device, self.tokenizer = spec, record, device, tokenizer
        self.model = load_scoring_model(folder)
        self.model.to(device).eval()
        # the last layer for the first token only (tmkd.teachers.first_token), checked on every part (score)
        self.first_token = wrap_last_layer(self.model) if spec.first_token_last_layer else None
        self.eager_model = self.model
        self.settings = scoring_settings(describe(device), self.model.config, spec.dtype, spec.max_length,
                                         spec.batch_tokens, 1 if spec.compile else spec.cpu_streams)
        if spec.compile:  # dynamic shapes: one compile serves every batch length (BENCHMARKS.md, section 1-4)
            check_compiler(spec)
            self.model = torch.compile(self.model, dynamic=True)
        self.amp = self.settings.autocast
        self.compute_dtype = self.settings.compute_dtype
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.forward_passes = 0
        self.first_token_checks = 0

    @torch.no_grad()
    def score(self, enc: Encoded, on_batch=None) -> np.ndarray:
        """Logits [rows, labels] in float32, in the rows' original order.

        No host sync per batch: the logits stay on the device and come back READBACK_BATCHES batches at a
        time (read_back), so a GPU queues the next forwards while earlier ones run."""
        out = np.empty((len(enc), self.model.config.num_labels), dtype=np.float32)
        batches = length_batches(enc.lengths, self.settings.batch_tokens, self.settings.max_rows)
        if self.first_token is not None and len(enc):
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                self.check_first_token(enc)
        self.forward_passes += len(batches)
        streams = min(self.settings.streams, len(batches))
        if streams > 1:
            self.forward_streams(enc, batches, out, on_batch, streams)
        else:
            self.forward(enc, batches, out, on_batch)
        return out

    def forward(self, enc: Encoded, batches: Iterable[np.ndarray], out: np.ndarray, on_batch=None) -> None:
        """Forward ``batches`` in turn, each batch's logits into ``out`` at its rows."""
        pending: list[tuple[np.ndarray, torch.Tensor]] = []
        # One autocast context for all the part's batches, under no_grad rather than inference_mode: autocast
        # then caches the weights' bf16 copies until the context exits, so they are cast once per part, not
        # once per batch (under inference_mode it caches nothing). +3-10% pairs/s in bf16 on this CPU.
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            for rows in batches:
                batch = {k: to_device(v, self.device) for k, v in pad_batch(enc, rows, self.pad_id).items()}
                pending.append((rows, self.model(**batch).logits.float()))
                if len(pending) == READBACK_BATCHES:
                    read_back(pending, out, on_batch)
            read_back(pending, out, on_batch)

    def forward_streams(self, enc: Encoded, batches: list[np.ndarray], out: np.ndarray, on_batch, streams: int):
        """On a CPU: ``streams`` threads take the batches from one queue (longest first) and forward them, each on
        its share of torch's threads. A row's logits are the same whichever stream computes it: those of one
        forward on that many threads."""
        queue: SimpleQueue = SimpleQueue()
        for rows in batches:
            queue.put(rows)

        def take():
            while True:
                try:
                    yield queue.get_nowait()
                except Empty:
                    return

        def drain() -> None:  # empty the queue, so every stream stops after its batch
            for _ in take():
                pass

        lock = threading.Lock()

        def counted(n: int) -> None:  # the caller's progress bar, from one stream at a time
            with lock:
                on_batch(n)

        threads = torch.get_num_threads()

        def stream(i: int) -> None:
            # this thread's own OpenMP and MKL thread counts: the threads shared out, the first streams take the rest.
            # torch sets a new thread's count from the process-wide one at its first parallel op, which another
            # stream may have just changed: that first call comes here, before the thread sets its own.
            torch.get_num_threads()
            torch.set_num_threads(max(1, threads // streams + (i < threads % streams)))
            try:
                self.forward(enc, take(), out, counted if on_batch is not None else None)
            except BaseException:
                drain()
                raise

        try:
            with ThreadPoolExecutor(streams, thread_name_prefix=f"score-{self.spec.name}") as pool:
                futures = [pool.submit(stream, i) for i in range(streams)]
                try:
                    for future in futures:
                        future.result()
                except BaseException:  # a failed stream, or Ctrl-C here
                    drain()
                    raise
        finally:
            torch.set_num_threads(threads)  # a stream's call also changed torch's default for threads started later

    def check_first_token(self, enc: Encoded) -> None:
        """Compare the first-token last layer with the full one on the part's 8 longest and 8 shortest rows (one
        padded batch); past the tolerance, warn and score with the full layer from here on."""
        by_length = np.argsort(enc.lengths, kind="stable")
        rows = np.unique(np.concatenate([by_length[:8], by_length[-8:]]))
        batch = {k: to_device(v, self.device) for k, v in pad_batch(enc, rows, self.pad_id).items()}
        difference, scale = max_difference(self.eager_model, self.first_token, batch)
        atol, rtol = FIRST_TOKEN_TOLERANCE if self.amp is None else FIRST_TOKEN_TOLERANCE_HALF
        tolerance = atol + rtol * scale
        self.first_token_checks += 1
        if not difference <= tolerance:  # NaN included
            warnings.warn(f"teacher {self.spec.name!r}: computing the last layer for the first token only changed "
                          f"the logits by {difference:.3g} (tolerance {tolerance:g}); scoring with the full last "
                          "layer instead (first_token_last_layer = false turns this off)")
            self.first_token.enabled = False
            self.first_token = None


# (absolute, relative to the largest |logit|) |logit| differences the first-token layer may show against the full one.
# bf16/fp16: a few roundings of the logit itself (bf16 keeps 8 significant bits: a step of 2^-7 of the value; near 8
# that is 0.03-0.06). Measured on MiniLM with its head scaled to logits near 8: 0.078 in bf16 (review, 2026-11-30).
FIRST_TOKEN_TOLERANCE = (1e-3, 1e-4)
FIRST_TOKEN_TOLERANCE_HALF = (3e-2, 2**-5)
READBACK_BATCHES = 16  # batches whose logits come back to the host together (one wait for the device each time)


def read_back(pending: list[tuple[np.ndarray, torch.Tensor]], out: np.ndarray, on_batch=None) -> None:
    """Put the pending batches' logits into ``out`` (at their rows) and empty ``pending``. From a GPU they are
    copied into pinned host memory without blocking, then waited for once; on a CPU they are already there."""
    if not pending:
        return
    device = pending[0][1].device
    if device.type == "cuda":
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for _, t in pending]
        for h, (_, t) in zip(host, pending):
            h.copy_(t, non_blocking=True)
        torch.cuda.current_stream(device).synchronize()
    else:
        host = [t.cpu() for _, t in pending]  # a CPU tensor: itself
    for (rows, _), h in zip(pending, host):
        out[rows] = h.numpy()
        if on_batch is not None:
            on_batch(len(rows))
    pending.clear()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if not getattr(tok, "is_fast", False):
        warnings.warn(f"{folder}: no fast tokenizer; tokenization will be slow")
    return tok


def score_folder(folder: Path, text_a: list[str], text_b: list[str], max_length: int = 128,
                 dtype: str = "bfloat16", device: str = "cpu") -> tuple[np.ndarray, float]:
    """Score pairs with any sequence-classification folder (a teacher or an exported student).

    Returns (logits [rows, labels], pairs/s); the time covers tokenizing and scoring, not loading.
    Used to compare teachers and students on equal terms.
    """
    import time

    folder = Path(folder)
    spec = TeacherSpec(name="scorer", path=str(folder), max_length=max_length, dtype=dtype)
    tok = load_tokenizer(folder)
    model = LoadedTeacher(spec, None, folder, torch.device(device), tok)
    start = time.perf_counter()
    logits = model.score(encode_pairs(tok, text_a, text_b, max_length, spec.truncation))
    return logits, len(text_a) / (time.perf_counter() - start)
