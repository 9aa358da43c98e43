"""glibc malloc tuning, so memory freed after a large request goes back to the operating system.

glibc serves allocations above its mmap threshold with ``mmap`` (returned to the OS on ``free``),
but raises that threshold each time such a block is freed, up to 32 MiB; from then on a decoded
image's blocks come from the heap and stay in the process after the request (measured: 428 MiB two
seconds after a hostile mix, against 116 MiB before it). Fixing the threshold (which also stops the
dynamic adjustment) keeps big blocks on ``mmap``. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD_BYTES = 256 * 1024


def keep_large_blocks_returnable(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Set glibc's mmap threshold to ``threshold`` bytes; True when it was set."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, threshold) == 1
    if not done:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; freed memory may stay in the process")
    return done
