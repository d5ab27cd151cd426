"""Keep freed CPU memory in the process, so that a forward pass does not page-fault on every call.

glibc's malloc serves every block above its mmap threshold (128 KiB, rising with what is freed to at
most 32 MiB) with fresh pages from the kernel and hands them back when the block is freed. A PyTorch
forward on the CPU allocates and frees its activations on every call, so each call faults gigabytes
of memory in again, page by page, zeroed. A benchmark process timing deris-b-grefcoco at 384 and
1024 px took 23 M minor page faults, under 1 M with the memory kept, and PyTorch ran end to end
1.19x faster at 384 px and 1.39x at 1024 px (docs/deployment.md, "PyTorch on the CPU: memory"):
the faults were most of why its latency grew faster than the pixel count (exponent 1.13 in the
sweep before, 0.87 after). ONNX Runtime is not affected: its arena keeps what it allocated.

The fix is two glibc settings: never use ``mmap`` for a block, and never trim the heap back to the
kernel. The process then keeps its peak memory for reuse, as ONNX Runtime's arena does. The
command-line tools apply it (``deris`` and ``deris-export`` run as programs, the benchmarks); a
program using the Python API can call :func:`keep_freed_memory` itself. Users who set glibc's own
malloc variables (``MALLOC_*_`` or a ``glibc.malloc`` tunable) keep theirs.
"""

from __future__ import annotations

import ctypes
import os

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# mallopt takes an int: the largest trim threshold it accepts
NEVER_TRIM = 2**31 - 1


def on_glibc() -> bool:
    """Whether this process runs on glibc (asked of the C library itself, not read from a binary)."""
    try:
        return (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")
    except (ValueError, OSError):  # the name is unknown to this platform's C library
        return False


def user_malloc_settings() -> list[str]:
    """The glibc malloc settings in this process's environment, which :func:`keep_freed_memory` respects."""
    names = [name for name in os.environ if name.startswith("MALLOC_") and name.endswith("_")]
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        names.append("GLIBC_TUNABLES")
    return sorted(names)


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module docstring).

    Returns whether the setting is in effect: False off glibc (macOS, musl, Windows) and where the
    environment already holds the user's own malloc settings, which are left as they are.
    """
    if not on_glibc() or user_malloc_settings():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # mallopt returns 1 on success; both calls also switch off glibc's moving mmap threshold
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))
