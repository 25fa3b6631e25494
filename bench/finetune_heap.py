"""Where teacher fine-tuning's memory sits, step by step: glibc's heap (in use against free) and the tensors Python
holds. The probe behind BENCHMARKS.md section 10 ("Now: ...").

Runs `teachers/finetune.py` in this process (same arguments) and, after every optimizer step where the heap grew by
20 MB or more, prints the RSS, the heap's size, the bytes in use and free in it (glibc's ``mallinfo2``, all arenas)
and the bytes mmapped apart from it; at steps 3, 30 and 60, the bytes of every tensor storage Python can reach.
Set ``LRU_CACHE_CAPACITY`` or ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` in the environment to compare the caches:

    LRU_CACHE_CAPACITY=1024 python bench/finetune_heap.py --config bench/configs/wikiqa-one-teacher.toml --store runs/wikiqa/store \\
        --out runs/bench-heap --set max_train_rows=4000 --set max_dev_rows=500 --set 'test_corpus=""' \\
        --set threads=1 --set epochs=1

glibc only.
"""
from __future__ import annotations

import ctypes
import gc
import sys
import warnings
from pathlib import Path

import torch

import tmkd.teachers.finetune as ft

MB = 1 << 20


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallinfo2.restype = MallInfo2


def rss_mb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0


def heap_line(tag: str) -> str:
    m = LIBC.mallinfo2()
    return (f"{tag}: RSS {rss_mb()} MB | heap {m.arena // MB} MB: in use {m.uordblks // MB}, free {m.fordblks // MB} "
            f"| mmapped {m.hblkhd // MB} MB")


def python_tensors_mb() -> int:
    storages = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some library objects warn when asked what they are
        objects = [obj for obj in gc.get_objects() if torch.is_tensor(obj)]
    for obj in objects:
        try:
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        except RuntimeError:
            pass
    return sum(storages.values()) // MB


def main(argv: list[str]) -> int:
    step, grown = [0], [0]
    train_epoch = ft.train_epoch

    def probed_epoch(accelerator, model, optimizer, *args, **kwargs):
        step_once = optimizer.step

        def step_and_probe(*a, **k):
            out = step_once(*a, **k)
            step[0] += 1
            if step[0] in (3, 30, 60):
                print(f"step {step[0]}: tensors Python holds {python_tensors_mb()} MB", flush=True)
            arena = LIBC.mallinfo2().arena
            if arena > grown[0] + 20 * MB:
                grown[0] = arena
                print(heap_line(f"step {step[0]}, heap grew"), flush=True)
            return out

        optimizer.step = step_and_probe
        return train_epoch(accelerator, model, optimizer, *args, **kwargs)

    ft.train_epoch = probed_epoch
    code = ft.main(argv)
    peak = [ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:")][0]
    print(heap_line("end"), f"| peak RSS {int(peak.split()[1]) // 1024} MB", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
