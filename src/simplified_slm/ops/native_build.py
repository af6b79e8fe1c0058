"""Build a small C kernel library on first use and load it through ctypes (HGRN scan,
quantized GEMV), and the C++ shims that register such kernels as torch ops.

Why C through ctypes rather than a torch C++ extension: the sources are plain C99 with no
torch headers, so the compiler (`$CC`, else cc/gcc/clang) builds them in about a second
instead of the ~45 s a torch extension takes, and no ninja is needed. Where the dispatch
cost of a Python-implemented op matters (the quantized GEMV, ~210 calls per decoded token),
a few lines of C++ register the kernel with torch's dispatcher instead (`load_torch_ops`):
only torch's own headers and `$CXX` (else c++/g++/clang++), ~7 s once. Libraries are cached
under `$SLM_KERNEL_CACHE` (default `~/.cache/simplified_slm/kernels`), keyed by a hash of
the source, flags, compiler version and (for `-march=native` builds) the CPU, and written
atomically, so concurrent processes (DDP ranks) never load a half-written file. OpenMP
comes from the `libgomp.so.1` torch already loaded, so kernels share torch's thread pool
and honour `torch.get_num_threads()`.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)


def compiler() -> str | None:
    return _first_found(os.environ.get("CC"), "cc", "gcc", "clang")


def cxx_compiler() -> str | None:
    return _first_found(os.environ.get("CXX"), "c++", "g++", "clang++")


def _first_found(*names: str | None) -> str | None:
    for name in names:
        if name and shutil.which(name):
            return name
    return None


def cache_dir() -> Path:
    configured = os.environ.get("SLM_KERNEL_CACHE")
    if configured:
        return Path(configured)
    home = Path.home() / ".cache" / "simplified_slm" / "kernels"
    try:
        home.mkdir(parents=True, exist_ok=True)
        return home
    except OSError:
        return Path(tempfile.gettempdir()) / "simplified_slm_kernels"


def _cpu_identity() -> str:
    """What `-march=native` compiles for: a cache shared between machines must not hand one
    CPU's library to another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(dict.fromkeys(wanted))


def _build(cc: str, name: str, source: str, flag_sets: Sequence[Sequence[str]], target: Path,
           suffix: str = ".c", link: Sequence[str] = ()) -> None:
    """Compile with the first flag set that works into a temp file beside `target`, then
    rename: readers never see half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / f"{name.lower()}{suffix}"
        src.write_text(source)
        built = Path(tmp) / target.name
        errors = []
        for flags in flag_sets:
            result = subprocess.run([cc, *flags, str(src), "-o", str(built), *link], capture_output=True, text=True)
            if result.returncode == 0:
                os.replace(built, target)
                return
            errors.append(result.stderr.strip().splitlines()[-1:] or ["(no output)"])
        raise OSError(f"{cc} failed: {errors}")


def _enabled_compiler(disable_env: str, find: Callable[[], str | None], missing: str) -> str | None:
    """The compiler to build with, or None: `disable_env`=0, Windows, or none found (then
    `missing` is logged)."""
    if os.environ.get(disable_env, "1") == "0" or sys.platform == "win32":
        return None
    found = find()
    if found is None:
        logger.warning(missing)
    return found


def load_library(name: str, source: str, flag_sets: Sequence[Sequence[str]], disable_env: str) -> ctypes.CDLL | None:
    """The built library `name`, or None (logged once by the caller's cache) when it cannot be
    had here: `disable_env`=0, Windows, no compiler, or every flag set failing.

    `flag_sets` are tried in order (e.g. with OpenMP and -march=native first, a plain
    build last), so a compiler lacking an option still gives a working, slower kernel.
    """
    cc = _enabled_compiler(disable_env, compiler,
                           f"no C compiler found: the {name} kernel falls back to PyTorch (slower); install cc or gcc")
    if cc is None:
        return None
    try:
        native = any("-march=native" in flags for flags in flag_sets)
        path = _cached_build(cc, name, source, flag_sets, _cpu_identity() if native else "")
        return ctypes.CDLL(str(path))
    except OSError as err:
        logger.warning("%s C kernel unavailable (%s): falling back to PyTorch", name, err)
        return None


def load_torch_ops(name: str, source: str, disable_env: str) -> bool:
    """Build the C++ `source` (TORCH_LIBRARY_IMPL registrations) against this torch and load
    it into the dispatcher; False (logged) when it cannot be had here, so the caller
    registers its Python implementation instead."""
    cxx = _enabled_compiler(disable_env, cxx_compiler,
                            f"no C++ compiler found: the {name} ops dispatch through Python (slower); install c++ or g++")
    if cxx is None:
        return False
    import torch
    import torch.utils.cpp_extension

    torch_lib = str(Path(torch.__file__).parent / "lib")
    common = ["-O2", "-shared", "-fPIC", "-w", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
              *(f"-I{p}" for p in torch.utils.cpp_extension.include_paths())]
    flag_sets = [[*common, standard] for standard in ("-std=c++20", "-std=c++17")]
    link = [f"-L{torch_lib}", f"-Wl,-rpath,{torch_lib}", "-lc10", "-ltorch_cpu"]
    try:
        path = _cached_build(cxx, name, source, flag_sets, torch.__version__, suffix=".cpp", link=link)
        torch.ops.load_library(str(path))
        return True
    except (OSError, RuntimeError) as err:
        logger.warning("%s torch ops unavailable (%s): dispatching through Python (slower)", name, err)
        return False


def _cached_build(cc: str, name: str, source: str, flag_sets: Sequence[Sequence[str]], identity: str,
                  suffix: str = ".c", link: Sequence[str] = ()) -> Path:
    """The library built from `source`, compiled once per source, flags, compiler and
    `identity` (the CPU for -march=native builds, the torch version for op shims)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    parts = [source, repr([list(f) for f in flag_sets]), repr(list(link)), version, identity]
    key = hashlib.sha256("\n".join(parts).encode()).hexdigest()
    path = cache_dir() / f"{name.lower()}_{key[:16]}.so"
    if not path.exists():
        _build(cc, name, source, flag_sets, path, suffix, link)
    return path
