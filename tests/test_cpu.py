"""The process settings that keep long CPU jobs' memory flat (tmkd.teachers.cpu): defaults, and the user's win."""
from __future__ import annotations

import os
import subprocess
import sys

SHOW = ("from tmkd.teachers.cpu import bound_cpu_caches; import os; bound_cpu_caches(); "
        "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'], os.environ['LRU_CACHE_CAPACITY'])")


def run_child(**env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY",
                                                                     "MALLOC_ARENA_MAX")}
    return subprocess.run([sys.executable, "-c", SHOW], env={**base, **env}, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_kernel_caches_are_bounded_unless_the_user_sets_them():
    assert run_child() == "8 8"
    assert run_child(ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024") == "1024 8"
    assert run_child(LRU_CACHE_CAPACITY="1024") == "8 1024"
