"""Process settings for running the model on the CPU.

glibc's malloc hands every allocation above its mmap threshold (128 KiB, raised up to 32 MiB as
big chunks are freed) its own fresh pages, and returns the top of the heap to the system once 2x
that threshold is free there. A forward on the CPU allocates and frees activations of megabytes
every op, so each op pays page faults for its output: an RMSNorm over 2048 tokens spent 3.5 ms, 80%
of it faulting. `tune_allocator` keeps such memory in the heap for reuse instead, as the
tcmalloc that vLLM's CPU backend asks to be preloaded does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 1 << 30  # larger blocks (weights, the arena) still get their own mapping
TRIM_THRESHOLD = (1 << 31) - 1  # an int: glibc's mallopt takes one
TOP_PAD = 256 << 20


@functools.cache
def tune_allocator() -> bool:
    """Make glibc keep freed activation memory for reuse (process-wide, once; see the module). True if
    the settings took, False where the C library is not glibc (nothing is changed then)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # glibc only: mallopt's parameters differ elsewhere
    except (OSError, AttributeError):
        return False
    ok = all(libc.mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    if not ok:
        logger.warning("glibc refused the CPU allocator settings (mallopt); activations will fault in fresh pages")
    return ok
