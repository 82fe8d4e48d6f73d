"""Output layout of pyfused's dropout against torch 2.13's: the strides torch's `input * noise`
gives (a dense input's own strides, channels_last included; a non-dense input's strides sorted
as TensorIterator sorts them), while the mask stays a function of the row-major index."""

import pytest
import torch

import pyfused.nn.functional as F

TF = torch.nn.functional


def layouts():
    """(name, tensor): contiguous, dense permuted, and non-dense inputs, the same values on
    every call."""
    torch.manual_seed(0)
    base = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    return [
        ("contiguous", base.clone()),
        ("channels_last", base.to(memory_format=torch.channels_last)),
        ("channels_last_3d", torch.randn(2, 3, 2, 4, 5).to(memory_format=torch.channels_last_3d)),
        ("transposed", torch.randn(6, 7).t()),
        ("permuted", torch.randn(2, 3, 4).permute(2, 0, 1)),
        ("strided_columns", torch.randn(6, 8)[:, ::2]),
        ("column_slice", torch.randn(6, 8)[:, 1:5]),
        ("transposed_and_strided", torch.randn(4, 6).t()[::2]),
        ("size1_odd_stride", torch.randn(4, 1, 6).transpose(0, 1)),
        ("expanded", torch.randn(1, 8).expand(4, 8)),
    ]


FUNCTIONS = {
    "dropout": (F.dropout, TF.dropout, range(1, 6)),
    "dropout1d": (F.dropout1d, TF.dropout1d, (2, 3)),
    "dropout2d": (F.dropout2d, TF.dropout2d, (3, 4)),
    "dropout3d": (F.dropout3d, TF.dropout3d, (4, 5)),
}


PAIRS = [(name, case) for name, (_, _, dims) in FUNCTIONS.items()
         for case, (_, x) in enumerate(layouts()) if x.dim() in dims]


@pytest.mark.filterwarnings("ignore:dropout2d. Received a 3D input")
@pytest.mark.parametrize("name,case", PAIRS, ids=[f"{n}-{layouts()[c][0]}" for n, c in PAIRS])
def test_output_strides_are_torchs(name, case):
    ours, theirs, _ = FUNCTIONS[name]
    _, x = layouts()[case]
    y, expected = ours(x, 0.5), theirs(x, 0.5)
    assert (y.shape, y.stride()) == (expected.shape, expected.stride())
    # the mask is the row-major index's: the same seed gives the values of the contiguous input
    torch.manual_seed(11)
    y = ours(x, 0.5)
    torch.manual_seed(11)
    assert torch.equal(y, ours(x.contiguous(), 0.5))


@pytest.mark.parametrize("case", range(len(layouts())), ids=[n for n, _ in layouts()])
def test_backward_and_inplace_of_non_contiguous_inputs(case):
    _, x = layouts()[case]
    leaf = x.requires_grad_()
    torch.manual_seed(3)
    y = F.dropout(leaf, 0.4)
    grad = torch.randn_like(y).t().contiguous().t() if y.dim() == 2 else torch.randn_like(y)
    y.backward(grad)
    kept = y.detach() != 0
    assert torch.equal(leaf.grad, grad * kept * torch.ones((), dtype=x.dtype).div_(0.6))
    if 0 not in x.stride():  # an expanded tensor cannot be written in place
        _, target = layouts()[case]
        torch.manual_seed(3)
        out = F.dropout(target, 0.4, inplace=True)
        assert out is target and out.stride() == x.stride()
        assert torch.equal(out, y.detach())


@pytest.mark.parametrize("bias", [False, True])
def test_dropout_add_strides_are_torchs(bias):
    x = torch.randn(3, 5, 6).permute(0, 2, 1)
    residual = torch.randn(3, 6, 5)
    b = torch.randn(5) if bias else None
    out = F.dropout_add(x, residual, 0.3, bias=b)
    expected = residual + TF.dropout(x if b is None else x + b, 0.3)
    assert out.stride() == expected.stride()
    torch.manual_seed(5)
    out = F.dropout_add(x, residual, 0.3, bias=b)
    torch.manual_seed(5)
    assert torch.equal(out, F.dropout_add(x.contiguous(), residual, 0.3, bias=b))
