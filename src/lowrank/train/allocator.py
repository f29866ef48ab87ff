"""Keep freed memory in the process for the next training step (glibc only).

A training step frees and re-allocates the same large activations every time.  Under glibc's
default malloc, blocks above its (adaptive) mmap threshold are mapped fresh on each allocation and
the top of the heap is handed back to the system once freed, so every step faults the same pages
in again: at the issue-2 anchor about 100k minor faults a step for PEFT's LoRA and for DoRA,
which shows up as 5-10% of the step.  The processes that ``lowrank train`` and ``lowrank bench``
start ask glibc to keep that memory instead (what ``MALLOC_MMAP_MAX_=0`` and a large
``MALLOC_TRIM_THRESHOLD_`` do, set from inside the process); the peak is the same, only its
release is deferred to exit.  Set ``LOWRANK_MALLOC=default`` to leave glibc as it is.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters, <malloc.h>
_M_MMAP_MAX = -4


def keep_freed_heap() -> bool:
    """Make glibc keep freed heap memory for reuse (process-wide); True when applied.

    Nothing is changed off Linux/glibc, or when ``LOWRANK_MALLOC=default`` is set.
    """
    if os.environ.get("LOWRANK_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # large blocks come from the heap, not from fresh mappings, and the heap's top is not trimmed
    return mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
