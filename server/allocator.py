"""glibc malloc tuning, so memory freed after a large request goes back to the operating system.

glibc serves allocations above its mmap threshold with ``mmap`` (returned to the OS on ``free``),
but raises that threshold each time such a block is freed, up to 32 MiB; from then on a decoded
image's blocks come from the heap and stay in the process after the request (measured: 428 MiB two
seconds after a hostile mix, against 116 MiB before it). Fixing the threshold (which also stops the
dynamic adjustment) keeps big blocks on ``mmap``; the trim threshold is set with it (fixing one fixes
both, and glibc's 128 KiB trim default trims the heap on nearly every free). A no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024  # a decoded image of over ~1.4 MP RGB: mmap, returned on free
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024  # heap top kept before trimming: no sbrk churn on every small free


def keep_large_blocks_returnable(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Set glibc's mmap threshold to ``threshold`` bytes; True when it was set."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # fixing the mmap threshold also fixes the trim threshold at its 128 KiB default, which trims the heap on
    # nearly every free (measured: a quarter of the task API's single-caller throughput); set it too
    done = mallopt(M_MMAP_THRESHOLD, threshold) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1
    if not done:
        log.debug("mallopt(M_MMAP_THRESHOLD) refused; freed memory may stay in the process")
    return done
