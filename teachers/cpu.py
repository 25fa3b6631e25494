"""Process settings that keep a long CPU job's memory flat as the corpus grows.

Used by `tmkd-label run` and by the student trainer (measured in BENCHMARKS.md, section 6).
Length batching gives many distinct batch shapes, and oneDNN caches compiled kernels per shape
(1,024 by default), so resident memory grew with the number of batches seen: 1.35x (labeler) and
1.21x (trainer) from a 1x to a 10x corpus. A kernel cache of 8 plus two malloc arenas held both
to <= 1.09x, at a cost in speed within noise (bench/kernel_cache.py); the labeler also returns
freed memory to the OS between parts (release_free_memory).
"""
from __future__ import annotations

import os


def _glibc():
    """The C library, if it is glibc (its malloc is what these settings tune); else None."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def bound_cpu_caches() -> None:
    """Bound oneDNN's kernel cache, PyTorch's ideep cache and glibc's malloc arenas; values set in the environment
    win.

    Call it before the first forward pass: oneDNN and ideep read their settings when they make their first kernel.
    ideep (PyTorch's oneDNN wrapper) keeps its own cache of computations per shape, ``LRU_CACHE_CAPACITY`` (1,024
    by default): in teacher fine-tuning it held 250 MB more after 60 steps of varied shapes, and bounding it kept
    the memory in use flat (BENCHMARKS.md, section 10).
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")
    os.environ.setdefault("LRU_CACHE_CAPACITY", "8")
    libc = _glibc()
    if libc is not None and "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(-8, 2)  # M_ARENA_MAX = 2


def release_free_memory() -> None:
    """Hand memory that was freed back to the OS (glibc keeps it in its heaps otherwise); a few ms.

    Called between corpus parts: each part's token arrays, texts and logits are freed once written,
    and without this the freed pages stayed resident and peak RSS crept up with the number of parts.
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
