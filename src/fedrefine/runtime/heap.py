"""glibc's heap for CPU inference: keep large freed blocks for reuse instead of handing them back to the OS.

By default glibc serves every block over 128 KiB (a threshold it raises as such blocks are freed, to
at most 32 MiB) with a fresh ``mmap`` and trims the top of its heap once 2x that is free. Fusion and the
models' forward passes allocate and free many-MB activations on every call, so under those defaults each
call touches fresh pages again: at a 126-token prompt the fuse stage takes about twice as long
(``benchmarks/results/latency.md``). The ``fedrefine`` commands therefore keep freed blocks up to 32 MiB
in the heap and trim it only past 4 GiB free: a process's resident memory then stays near its peak.

``FEDREFINE_GLIBC_HEAP=default`` leaves glibc's defaults; so does a ``GLIBC_TUNABLES`` that sets any
``glibc.malloc`` tunable (the user has chosen), and any C library that is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: Blocks up to this size come from the heap and return to it when freed (glibc's largest allowed value).
MMAP_THRESHOLD_BYTES = 32 * 2**20
#: The heap's free top is handed back to the OS only past this size.
TRIM_THRESHOLD_BYTES = 4 * 2**30
ENVIRONMENT_VARIABLE = "FEDREFINE_GLIBC_HEAP"


def keep_large_blocks() -> bool:
    """Apply the settings above to this process; True when they were applied."""
    if os.environ.get(ENVIRONMENT_VARIABLE, "keep") == "default" or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return False
    if not (hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt")):  # not glibc
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
