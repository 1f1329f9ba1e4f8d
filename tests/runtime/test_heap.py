"""runtime/heap.py: freed heap pages go back to the OS (glibc's malloc_trim), which keeps a long-lived process's
resident set from growing over LoRA swaps and low-memory stages."""
from __future__ import annotations

import re
import sys

import pytest

from edgediff.heap import release_free_memory


def _rss_mib() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_freed_heap_pages_are_returned():
    blocks = [bytearray(64 * 1024) for _ in range(4000)]  # 250 MiB in blocks under glibc's mmap threshold: heap
    pin = bytearray(64 * 1024)  # allocated after them: the heap's top cannot shrink past it on free alone
    for b in blocks:
        b[::4096] = b"\x01" * len(b[::4096])  # touch every page
    del blocks
    before = _rss_mib()
    assert release_free_memory() is True
    assert before - _rss_mib() > 150, "malloc_trim returned less than 150 of 250 freed MiB"
    del pin
