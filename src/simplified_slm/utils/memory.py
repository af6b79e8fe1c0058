"""Peak resident memory of this process, for memory goals and benchmark tables.

Why not `resource.getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries it across execve, so a
subprocess started by a large process (pytest late in the suite, a benchmark driver)
reports its parent's peak instead of its own (measured: 5.5 GB for a child that peaked at
1.3 GB). /proc's VmHWM belongs to the process's own address space.
"""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    """The most resident memory this process has held (VmHWM; ru_maxrss where no /proc)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere
