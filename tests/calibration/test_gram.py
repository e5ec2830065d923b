"""GramSum: the upper-triangle, row-block accumulation of X^T X equals the full product."""

import sys

import pytest
import torch

from corda_vl.calibration.gram import BLOCK, MIN_BLOCKS, GramSum


@pytest.mark.parametrize("dim", [1, 3, 7, 4 * BLOCK - 1, 4 * BLOCK + 1, 6 * BLOCK])
def test_sum_equals_the_full_product_for_any_block_split(dim):
    g = torch.Generator().manual_seed(dim)
    chunks = [torch.randn(n, dim, generator=g, dtype=torch.float64) for n in (5, 1, 17)]
    gram = GramSum(dim, torch.float64, "cpu")
    for rows in chunks:
        gram.add(rows)
    x = torch.cat(chunks)
    expected = x.T @ x
    result = gram.result()
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(result, result.T)  # rebuilt from one triangle: exactly symmetric


def test_wide_inputs_get_blocks_of_about_block_columns_narrow_ones_at_least_the_minimum():
    assert GramSum(6 * BLOCK, torch.float32, "cpu")._block == BLOCK  # e.g. 1536 wide: 6 blocks of 256
    assert GramSum(576, torch.float32, "cpu")._block == -(-576 // MIN_BLOCKS)


def _resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_an_untouched_cpu_sum_is_not_resident_and_a_touched_one_is_its_own_storage():
    """Reserved sums of modules that turn out to share an input must cost nothing: 4 x 64 MB
    untouched, against 256 MB if they were allocated zero-filled by torch."""
    before = _resident_mb()
    sums = [GramSum(4096, torch.float32, "cpu") for _ in range(4)]
    assert _resident_mb() - before < 32
    sums[0].add(torch.ones(2, 4096))
    result = sums[0].result()
    assert torch.equal(result, torch.full((4096, 4096), 2.0))
    assert result.untyped_storage().nbytes() == result.nbytes  # saves like any tensor
