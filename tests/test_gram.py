"""GramSum: the upper-triangle, row-block accumulation of X^T X equals the full product."""

import pytest
import torch

from corda_vl.gram import BLOCK, MIN_BLOCKS, GramSum


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
