"""Memory figures from the kernel: this process's peak resident memory (for memory goals
and benchmark tables) and what a new allocation can still get (for refusing a config that
cannot fit); and handing freed heap pages back to it.

Why the peak is not `resource.getrusage(RUSAGE_SELF).ru_maxrss`: Linux carries it across
execve, so a subprocess started by a large process (pytest late in the suite, a benchmark
driver) reports its parent's peak instead of its own (measured: 5.5 GB for a child that
peaked at 1.3 GB). /proc's VmHWM belongs to the process's own address space.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import resource
import sys


def _proc_bytes(path: str, key: str) -> int | None:
    """A `key: N kB` line of a /proc file, in bytes (None where there is no such file)."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """The most resident memory this process has held (VmHWM; ru_maxrss where no /proc)."""
    peak = _proc_bytes("/proc/self/status", "VmHWM:")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def available_memory() -> int | None:
    """Bytes the kernel says a new allocation can get without swapping (None if unknown)."""
    available = _proc_bytes("/proc/meminfo", "MemAvailable:")
    if available is not None:
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


def release_freed_memory() -> None:
    """Return the pages of freed heap memory to the kernel (glibc's `malloc_trim`). A loop
    that allocates and frees multi-MB temporaries on several threads otherwise leaves them
    resident in per-thread arenas, by an amount that depends on thread timing: measured on
    streamed int4 quantization of a 1.23B model, a peak of 1.17 GB on an idle machine and
    1.68 GB beside two busy processes. A no-op where the C library has no `malloc_trim`."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
