"""The Triton dropout kernel: tl.rand4x against the reference Philox (pyfused/check/dropout_cases.py,
shared with tests/test_dropout.py and pyfused-check), and bit for bit against
the C++ kernel for the same seed (every dtype, dropout, dropout_add, channel dropout).

On a CUDA machine the kernels run compiled on the GPU, otherwise under the interpreter.
"""

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

import pyfused
from pyfused.check.dropout_cases import CROSS_BACKEND_PS, DTYPES, SIZES, assert_same_bits, philox_rand4x
from pyfused.nn import dropout as D
from triton_suite import DEVICE

# inf * 0 (a dropped inf) is NaN, as in torch; numpy, under the interpreter, warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")


@triton.jit
def _rand_kernel(seed_ptr, offsets_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    offsets = tl.load(offsets_ptr + i, mask=i < n, other=0)
    u0, u1, u2, u3 = tl.rand4x(tl.load(seed_ptr), offsets)
    tl.store(out_ptr + i, u0, mask=i < n)
    tl.store(out_ptr + n + i, u1, mask=i < n)
    tl.store(out_ptr + 2 * n + i, u2, mask=i < n)
    tl.store(out_ptr + 3 * n + i, u3, mask=i < n)


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32 + 5, 7692698082559361259, 2**63 - 1])
def test_reference_philox_is_tl_rand4x(seed):
    """Offsets past 2^31 and 2^32 (their high word is Philox's second counter) and seeds past
    2^32 (the second key word)."""
    offsets = np.concatenate([np.arange(300), 2**31 - 3 + np.arange(6), 2**32 - 3 + np.arange(6),
                              [3 * 2**32 + 12345, 2**62 + 1, 2**63 - 1]]).astype(np.int64)
    out = torch.empty(4, len(offsets), dtype=torch.float32, device=DEVICE)
    _rand_kernel[(1,)](torch.tensor([seed], device=DEVICE), torch.from_numpy(offsets).to(DEVICE), out,
                       len(offsets), BLOCK=512)
    assert np.array_equal(out.cpu().numpy().view(np.int32), philox_rand4x(seed, offsets).view(np.int32))


def both_backends(fn, *cpu_tensors):
    """fn's outputs with the C++ backend on CPU tensors and with Triton on DEVICE, as CPU tensors."""
    results = []
    for backend, device in (("cpp", "cpu"), ("triton", DEVICE)):
        with pyfused.use_backend(backend):
            out = fn(*(None if t is None else t.to(device) for t in cpu_tensors))
            results.append([t.cpu() for t in (out if isinstance(out, tuple) else (out,))])
    return results


def seed_on(device, value=7692698082559361259):
    return torch.tensor([value], dtype=torch.int64, device=device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("p", CROSS_BACKEND_PS)
def test_dropout_matches_cpp(dtype, n, p):
    x = torch.randn(n, dtype=torch.float64).to(dtype)
    x[0] = float("inf")
    cpp, tri = both_backends(lambda t: D._MaskedScale.apply(t, seed_on(t.device), p, 1, False), x)
    assert_same_bits(cpp[0], tri[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [3, 100, 20000])
def test_channel_dropout_matches_cpp(dtype, group):
    x = torch.randn(70001 // group + 1, group, dtype=torch.float64).to(dtype)
    cpp, tri = both_backends(lambda t: D._MaskedScale.apply(t, seed_on(t.device), 0.4, group, False), x)
    assert_same_bits(cpp[0], tri[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_dropout_add_matches_cpp_forward_and_backward(dtype, with_bias):
    x, r = torch.randn(517, 129, dtype=dtype), torch.randn(517, 129, dtype=dtype)
    b = torch.randn(129, dtype=dtype) if with_bias else None

    def run(x, r, b):
        inputs = [t.requires_grad_() for t in (x, r, b) if t is not None]
        out = D._DropoutAdd.apply(x, r, b, seed_on(x.device), 0.3)
        grads = torch.autograd.grad(out, inputs, torch.ones_like(out) * 3)
        return (out.detach(),) + grads

    cpp, tri = both_backends(run, x, r, b)
    for a, c in zip(cpp, tri):
        assert_same_bits(a, c)


def test_public_api_runs_on_triton():
    x = torch.randn(64, 33, device=DEVICE, requires_grad=True)
    y = pyfused.nn.functional.dropout(x, 0.5)
    y.sum().backward()
    assert torch.equal(x.grad, (y.detach() != 0) * torch.ones((), device=DEVICE).div_(0.5))
    z = x.detach().clone()
    assert pyfused.nn.functional.dropout(z, 0.5, inplace=True) is z
    out = pyfused.nn.Dropout2d(0.5)(torch.randn(4, 8, 3, 3, device=DEVICE))
    assert ((out == 0).flatten(2).all(2) | (out != 0).flatten(2).all(2)).all()
