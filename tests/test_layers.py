"""The layer kinds an adapter can go on: nn.Linear and transformers Conv1D, read as (d_out, d_in)."""

import torch
from transformers.pytorch_utils import Conv1D

from corda_vl.layers import is_adaptable, is_conv1d, linear_weight


def test_conv1d_weight_is_read_as_the_linear_it_computes_and_written_through():
    conv = Conv1D(nf=3, nx=5)  # 5 in, 3 out, weight stored (5, 3)
    x = torch.randn(2, 5)
    W = linear_weight(conv)
    assert W.shape == (3, 5) and is_conv1d(conv) and is_adaptable(conv)
    torch.testing.assert_close(conv(x), x @ W.T + conv.bias)
    with torch.no_grad():
        W[0, 4] = 7.0  # a view: the layer itself changes
    assert conv.weight[4, 0] == 7.0


def test_linear_is_adaptable_and_other_layers_are_not():
    linear = torch.nn.Linear(5, 3)
    assert linear_weight(linear) is linear.weight and is_adaptable(linear) and not is_conv1d(linear)
    assert not is_adaptable(torch.nn.Conv2d(3, 3, 1)) and not is_adaptable(torch.nn.Embedding(4, 4))
