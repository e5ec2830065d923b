"""Make the pages of CPU weights writable in one pass before they are rewritten in place.

``from_pretrained`` maps safetensors files privately: a weight's pages are the file's pages until
the first write to each, which copies it (copy-on-write). Taken one page fault at a time inside
the residual write's kernels, those copies cost more than the write itself. Linux's
``madvise(MADV_POPULATE_WRITE)`` (kernel 5.14+) makes the same copies in one system call per
weight without changing any value (measurements: docs/performance.md).

Only a hint: elsewhere (other OS, older kernel, GPU tensors) nothing happens and the write simply
takes its faults as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
from collections.abc import Iterable
from functools import lru_cache

import torch

MADV_POPULATE_WRITE = 23  # linux/mman.h; not exported by Python's mmap module before 3.13


@lru_cache(maxsize=None)
def _madvise():
    """libc's madvise, or None where there is no Linux libc to ask."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def prefault_for_writing(tensors: Iterable[torch.Tensor]) -> int:
    """Fault in, writable, the pages under each CPU tensor's data; returns how many tensors were.

    Values are unchanged. A page a tensor shares with a neighbour is made private too (a 4 KiB
    copy at most per end), as any in-place write to the tensor would do to the page it writes.
    """
    madvise = _madvise()
    if madvise is None:
        return 0
    page, done = mmap.PAGESIZE, 0
    for tensor in tensors:
        if tensor.device.type != "cpu" or tensor.numel() == 0 or not tensor.is_contiguous():
            continue
        start = tensor.data_ptr()
        end = start + tensor.nbytes
        first = start - start % page
        if madvise(first, end - first, MADV_POPULATE_WRITE) != 0:  # EINVAL before Linux 5.14
            return done
        done += 1
    return done
