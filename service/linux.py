"""What the service asks of Linux and glibc directly (elsewhere these do nothing): giving memory back after
large requests, a signal when the parent process dies, and the scheduling policy of the work processes.

glibc raises its mmap threshold to the size of the largest block freed (up to 32 MiB), so after one large
body every later one is carved from the heap, and a heap fragmented by a burst of them is kept
(docs/performance.md). A fixed threshold keeps large buffers in their own mappings, returned the moment they
are freed, and ``release()`` hands back the free pages left inside the heap.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 256 * 1024  # buffers this large or larger get their own mapping (glibc's default is 128 KiB)
# A work process's buffers of a few MB (a decoded photo, its float32 copies) come and go with every image: in
# mappings of their own, each one's pages were faulted in and zeroed anew, a third of a 1 MP photo's CPU. They are
# carved from the heap instead, which is kept up to the trim threshold and handed back after large batches
# (``release``).
WORK_MMAP_THRESHOLD = 16 * 1024 * 1024
WORK_TRIM_THRESHOLD = 32 * 1024 * 1024
LARGE = 1024 * 1024  # a request body this large is worth a trim once it is gone

try:
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallopt, _libc.malloc_trim  # noqa: B018 - both exist on glibc
except (OSError, AttributeError):
    _libc = None


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD, trim: int | None = None) -> None:
    """Fix glibc's mmap threshold (and, with ``trim``, how much free memory the heap keeps at its top)."""
    if _libc is not None:
        _libc.mallopt(M_MMAP_THRESHOLD, threshold)
        if trim is not None:
            _libc.mallopt(M_TRIM_THRESHOLD, trim)


PR_SET_PDEATHSIG = 1


def on_parent_death(sig: int) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies, however it dies (kill -9 included):
    a work process is killed with its HTTP worker, an HTTP worker drains when ``bentoml serve`` is gone."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
    except (OSError, AttributeError):
        pass


def release() -> None:
    """Return the free pages of the heap to the system (a few ms for a large heap: not per request)."""
    if _libc is not None:
        _libc.malloc_trim(0)


def batch_scheduling() -> bool:
    """Run this process (and the threads it starts later) under SCHED_BATCH: CPU-bound work that does not
    preempt the running task when it wakes, so that a work process handed a batch lets its HTTP worker finish
    what it is doing on that core first (docs/performance.md). Whether the policy was set."""
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]  # numpy's BLAS started its own at import
        for thread in threads:
            os.sched_setscheduler(thread, os.SCHED_BATCH, os.sched_param(0))
    except (AttributeError, OSError):  # not Linux, or a sandbox that forbids it: the default policy stays
        return False
    return True
