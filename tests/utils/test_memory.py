import os
import subprocess
import sys

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
