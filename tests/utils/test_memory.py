import os
import subprocess
import sys

import pytest
import torch

from simplified_slm.utils.memory import peak_rss_bytes

_CHILD = "from simplified_slm.utils.memory import peak_rss_bytes; print(peak_rss_bytes())"


def test_peak_rss_covers_what_is_resident_now():
    block = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MB, every page written
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    assert peak_rss_bytes() >= resident > block.numel()


def test_a_child_of_a_large_process_reports_its_own_peak():
    """ru_maxrss would report the parent's peak here (Linux keeps it across exec)."""
    block = torch.ones(400 << 20, dtype=torch.uint8)
    child = int(subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True).stdout)
    assert child < peak_rss_bytes() - 300e6, (child, peak_rss_bytes(), block.numel())


_FRAGMENTED_HEAP = """
from simplified_slm.utils.memory import _proc_bytes, release_freed_memory
blocks = [bytearray(100_000) for _ in range(3000)]  # 300 MB of heap chunks below glibc's mmap threshold
kept = blocks[49::50]  # every 50th stays alive, so the heap cannot shrink from its top
del blocks
before = _proc_bytes("/proc/self/status", "VmRSS:")
release_freed_memory()
print(before - _proc_bytes("/proc/self/status", "VmRSS:"))
"""


def test_release_freed_memory_hands_freed_heap_pages_back():
    if sys.platform != "linux":
        pytest.skip("malloc_trim and /proc are glibc/Linux facts")
    done = subprocess.run([sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert int(done.stdout) > 200e6  # of the ~294 MB freed between the kept blocks
