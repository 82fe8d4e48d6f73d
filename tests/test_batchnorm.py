"""pyfused.nn.BatchNorm*/BatchNormReLU* (C++ backend) against torch.nn.BatchNorm* (and torch.relu)
run in float64 on the same (rounded) inputs and parameters: a reference rounded once.

Tolerances, per dtype, relative to the largest reference value of each compared tensor (at least 1):
- fp32: 1e-5. Statistics and grad sums accumulate in double; what is left is float rounding of
  the elementwise passes (a few ulps, 2^-24 each) and of the per-channel coefficients.
- fp64: 1e-12: only summation order differs from the reference.
- bf16 / fp16: 2 ulps of the 16-bit type (2 * 2^-8, 2 * 2^-11): the math runs in float and rounds
  once on store, so one ulp from the rounding, one for float's own error on the way.
"""

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

import pyfused
from pyfused import nn as pnn

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2 * 2**-8, torch.float16: 2 * 2**-11}
TORCH = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
OURS = {2: pnn.BatchNorm1d, 3: pnn.BatchNorm1d, 4: pnn.BatchNorm2d, 5: pnn.BatchNorm3d}
OURS_RELU = {2: pnn.BatchNormReLU1d, 3: pnn.BatchNormReLU1d, 4: pnn.BatchNormReLU2d, 5: pnn.BatchNormReLU3d}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}

SHAPES = [(2, 1), (2, 3, 1, 1), (8, 16, 7, 7), (4, 64, 28, 28), (6, 13, 5, 5), (2, 3, 181, 181),
          (256, 33), (5, 7, 3), (3, 4, 70), (4, 3, 2, 3, 5), (1, 2, 65539)]


def close(actual, expected, tol, what, scale=1.0):
    scale = max(expected.double().abs().max().item(), scale) if expected.numel() else 1.0
    err = (actual.double() - expected.double()).abs().max().item() if expected.numel() else 0.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.3g} * {scale:.3g}"


def make(shape, dtype, param_dtype, relu, cl, **options):
    ndim = len(shape)
    ref = TORCH[ndim](shape[1], **options).double()
    ours = (OURS_RELU if relu else OURS)[ndim](shape[1], **options).to(param_dtype)
    if ref.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            if ref.bias is not None:
                ref.bias.uniform_(-1, 1)
    ours.load_state_dict(ref.state_dict())
    ref.load_state_dict(ours.state_dict())  # the reference starts from the rounded values
    return ref, ours


def batch(shape, dtype, cl, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 3 + 2).to(dtype)
    return x.to(memory_format=CHANNELS_LAST[len(shape)]) if cl else x


def run_and_compare(ref, ours, shape, dtype, relu, cl, steps=3, tol=None):
    tol = TOL[dtype] if tol is None else tol
    for step in range(steps):
        x = batch(shape, dtype, cl, step)
        xr, xo = x.to(torch.float64, copy=True).requires_grad_(), x.clone().requires_grad_()
        yr, yo = ref(xr), ours(xo)
        if relu:
            yr = torch.relu(yr)
        assert yo.dtype == dtype and yo.shape == yr.shape
        if cl:
            assert yo.is_contiguous(memory_format=CHANNELS_LAST[len(shape)])
        close(yo, yr, tol, f"step {step} output")
        if ref.training:
            grad = batch(shape, dtype, cl, 100 + step)
            yr.backward(grad.double())
            yo.backward(grad)
            # dx is a difference of terms of size |dy| * w * invstd (exactly 0 for two values per
            # channel): its rounding error scales with them, not with dx.
            dims = [d for d in range(len(shape)) if d != 1]
            invstd = (xr.detach().var(dim=dims, unbiased=False) + ref.eps).rsqrt().max().item()
            weight = ref.weight.abs().max().item() if ref.weight is not None else 1.0
            terms = grad.double().abs().max().item() * weight * invstd
            close(xo.grad, xr.grad, tol, f"step {step} dx", scale=terms)
            for name, p in ref.named_parameters():
                close(getattr(ours, name).grad, p.grad, tol, f"step {step} d{name}")
        for name, b in ref.named_buffers():
            close(getattr(ours, name), b, tol, f"step {step} {name}")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
def test_fp32_train_then_eval(shape, relu):
    torch.manual_seed(0)
    cl = False
    ref, ours = make(shape, torch.float32, torch.float32, relu, cl)
    run_and_compare(ref, ours, shape, torch.float32, relu, cl)
    assert ours.num_batches_tracked.item() == 3
    ref.eval(), ours.eval()
    run_and_compare(ref, ours, shape, torch.float32, relu, cl, steps=1)


@pytest.mark.parametrize("shape", [(8, 16, 7, 7), (2, 3, 1, 1), (3, 5, 4, 4, 4), (2, 64, 11, 13)], ids=str)
@pytest.mark.parametrize("dtype,param_dtype", [
    (torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16), (torch.bfloat16, torch.float32), (torch.float16, torch.float32)],
    ids=["fp32", "fp64", "bf16", "fp16", "bf16-fp32-params", "fp16-fp32-params"])
@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
def test_dtypes_and_layouts(shape, dtype, param_dtype, cl, relu):
    ref, ours = make(shape, dtype, param_dtype, relu, cl)
    run_and_compare(ref, ours, shape, dtype, relu, cl, steps=2)
    ref.eval(), ours.eval()
    run_and_compare(ref, ours, shape, dtype, relu, cl, steps=1)


@pytest.mark.parametrize("options", [
    dict(momentum=None), dict(momentum=0.3), dict(affine=False), dict(bias=False),
    dict(track_running_stats=False), dict(affine=False, track_running_stats=False), dict(eps=1e-3)],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_options(options):
    shape = (6, 5, 4, 3)
    ref, ours = make(shape, torch.float32, torch.float32, False, False, **options)
    run_and_compare(ref, ours, shape, torch.float32, False, False, steps=3)
    ref.eval(), ours.eval()
    run_and_compare(ref, ours, shape, torch.float32, False, False, steps=2)


def test_grad_in_eval_mode_and_odd_strides():
    ref, ours = make((4, 6, 5, 5), torch.float32, torch.float32, False, False)
    ref.eval(), ours.eval()
    base = torch.randn(5, 4, 6, 10)
    x = base.permute(1, 2, 0, 3)[..., ::2]  # neither contiguous nor channels_last
    xr, xo = x.double().requires_grad_(), x.detach().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    grad = torch.randn(4, 6, 5, 5).transpose(2, 3).contiguous().transpose(2, 3)
    yr.backward(grad.double()), yo.backward(grad)
    close(yo, yr, 1e-5, "output")
    close(xo.grad, xr.grad, 1e-5, "dx")
    close(ours.weight.grad, ref.weight.grad, 1e-5, "dweight")
    close(ours.bias.grad, ref.bias.grad, 1e-5, "dbias")


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels-last"])
def test_gradcheck_fp64(relu, training, cl):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64, generator=gen)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.rand(4, dtype=torch.float64, generator=gen).add_(0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, generator=gen).requires_grad_()
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        return pyfused.nn.batchnorm.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, relu=relu)

    assert torch.autograd.gradcheck(fn, (x, w, b))


def test_matches_torch_functional_and_zero_size():
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    ours = pnn.BatchNorm2d(3)
    y = ours(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(ours.weight.grad, torch.zeros(3)) and torch.equal(ours.bias.grad, torch.zeros(3))
    assert torch.equal(ours.running_mean, torch.zeros(3)) and torch.equal(ours.running_var, torch.ones(3))
    assert ours.num_batches_tracked.item() == 1


def test_saves_only_the_input_and_per_channel_values():
    for module in (pnn.BatchNorm2d(5), pnn.BatchNormReLU2d(5)):
        x = torch.randn(4, 5, 6, 6, requires_grad=True)
        saved = []
        with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            module(x)
        big = [t for t in saved if t.numel() > 5 * 4]
        assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), [tuple(t.shape) for t in saved]


def test_state_dict_round_trip_and_repr():
    ref = torch.nn.BatchNorm2d(7, momentum=0.2)
    ref(torch.randn(4, 7, 3, 3))
    ours = pnn.BatchNorm2d(7, momentum=0.2)
    ours.load_state_dict(ref.state_dict())
    back = torch.nn.BatchNorm2d(7, momentum=0.2)
    back.load_state_dict(ours.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    assert repr(ours) == repr(ref)
    assert isinstance(ours, torch.nn.BatchNorm2d)


def test_statistics_do_not_depend_on_thread_count():
    x = batch((7, 9, 65, 67), torch.float32, False, 3)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            m = pnn.BatchNorm2d(9)
            outs.append((m(x), m.running_mean.clone(), m.running_var.clone()))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


def test_large_mean_is_stable():
    x = torch.randn(16, 3, 64, 64, dtype=torch.float64) + 1e4  # |mean| / std = 1e4
    ours = pnn.BatchNorm2d(3)
    ours(x.float())
    ref_var = x.float().double().var(dim=(0, 2, 3))
    close(ours.running_var, 0.9 + 0.1 * ref_var, 1e-6, "running_var")


BAD = [
    (pnn.BatchNorm2d(4), torch.randn(2, 3, 5, 5), RuntimeError, "running_mean should contain 3 elements not 4"),
    (pnn.BatchNorm2d(4), torch.randn(1, 4, 1, 1), ValueError,
     "Expected more than 1 value per channel when training, got input size torch.Size([1, 4, 1, 1])"),
    (pnn.BatchNorm2d(4), torch.randn(2, 4, 5), ValueError, "expected 4D input (got 3D input)"),
    (pnn.BatchNorm1d(4), torch.randn(2, 4, 5, 5), ValueError, "expected 2D or 3D input (got 4D input)"),
    (pnn.BatchNorm3d(4), torch.randn(2, 4, 5, 5), ValueError, "expected 5D input (got 4D input)"),
    (pnn.BatchNorm2d(3, affine=True, track_running_stats=False), torch.randn(2, 4, 5, 5), RuntimeError,
     "weight should contain 4 elements not 3"),
    (pnn.BatchNorm2d(3).double(), torch.randn(2, 3, 5, 5), RuntimeError,
     "mixed dtype (CPU): expect parameter to have scalar type of Float"),
    (pnn.BatchNorm2d(3), torch.randn(2, 3, 5, 5, dtype=torch.float64), RuntimeError,
     "mixed dtype (CPU): all inputs must share same datatype."),
]


@pytest.mark.parametrize("module,x,error,message", BAD, ids=range(len(BAD)))
def test_bad_input_gets_torchs_error_and_changes_nothing(module, x, error, message):
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(error) as raised:
        module(x)
    assert str(raised.value) == message
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_forced_torch_backend_is_torch():
    ref, ours = make((4, 3, 5, 5), torch.float32, torch.float32, True, False)
    ref.float()
    x = torch.randn(4, 3, 5, 5)
    with pyfused.use_backend("torch"):
        y = ours(x)
    assert torch.equal(y, torch.relu(ref(x)))
