"""Running sums of X^T X, the inner loop of calibration.

X^T X is symmetric, so only the upper triangle is accumulated, in row blocks about ``BLOCK``
columns wide (at least ``MIN_BLOCKS``): block i multiplies its b columns of X with the columns
from i*b on, about (k+1)/(2k) of the full GEMM's flops for k blocks. Plain torch GEMMs, because a
second BLAS's threads slow the model's own matmuls (measurements: docs/performance.md).
"""

from __future__ import annotations

import mmap

import torch

BLOCK = 256
MIN_BLOCKS = 4


class GramSum:
    """Accumulates sum_t x_t x_t^T for rows x_t of shape (n, d)."""

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device | str):
        self.dim, self.dtype, self.device = dim, dtype, torch.device(device)
        self._upper = _long_lived_zeros(dim, dtype, self.device)
        self._touched = self.device.type != "cpu"  # torch.zeros wrote a GPU sum; a CPU mapping is untouched
        blocks = max(MIN_BLOCKS, -(-dim // BLOCK))
        self._block = -(-dim // blocks)

    def add(self, rows: torch.Tensor) -> None:
        if not self._touched:  # fault a fresh mapping in with one write pass, not inside the GEMMs
            self._upper.zero_()
            self._touched = True
        rows = rows.to(dtype=self.dtype)
        if rows.device != self.device:  # offloaded sum: multiply where the rows are, move d x d
            self._upper += (rows.T @ rows).to(self.device)
            return
        b = self._block
        for i in range(0, self.dim, b):
            self._upper[i:i + b, i:].addmm_(rows[:, i:i + b].T, rows[:, i:])

    def diagonal_finite(self) -> bool:
        """False once a NaN/Inf (or an overflow) has entered the sum: x_i^2 sits on the diagonal."""
        return bool(torch.isfinite(self._upper.diagonal()).all())

    def result(self) -> torch.Tensor:
        """The full symmetric sum, completed in place (the GramSum is finished afterwards).

        The diagonal blocks were written whole (their upper triangle is mirrored down, since a
        GEMM need not round x_i.x_j and x_j.x_i alike); each strict lower block is the transpose
        of its upper mirror. No d x d temporaries, so no extra peak and several times faster
        (docs/performance.md).
        """
        gram, self._upper = self._upper, None
        b = self._block
        for i in range(0, self.dim, b):
            diag = gram[i:i + b, i:i + b]
            diag.copy_(torch.triu(diag) + torch.triu(diag, diagonal=1).T)
            gram[i + b:, i:i + b].copy_(gram[i:i + b, i + b:].T)
        return gram


def _long_lived_zeros(dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A d x d zero matrix; on CPU in its own private anonymous mmap, outside the malloc heap.

    The kernel hands such pages out zeroed on first touch, so a sum reserved for a module that
    turns out to read a shared input costs no resident memory (see calibration's reservations),
    and the mapping goes back to the OS when the tensor dies, wherever it sat. It is its own
    storage: the store saves and moves it like any tensor. ``GramSum.add`` writes it once before
    its first GEMM, because page faults taken inside the BLAS's read-then-write of C cost far more
    than one zero-fill pass (docs/performance.md).
    """
    if device.type != "cpu":
        return torch.zeros(dim, dim, dtype=dtype, device=device)
    nbytes = dim * dim * dtype.itemsize
    private = {"flags": mmap.MAP_PRIVATE} if hasattr(mmap, "MAP_PRIVATE") else {}  # no MAP_PRIVATE on Windows
    return torch.frombuffer(mmap.mmap(-1, nbytes, **private), dtype=dtype).view(dim, dim)
