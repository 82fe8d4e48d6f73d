"""Shared tables for batch norm: the test suite (tests/test_batchnorm.py) and the checker
(batchnorm.py) import them from here.

pyfused.nn.BatchNorm*/BatchNormReLU* against torch.nn.BatchNorm* (and torch.relu) run in float64
on the same (rounded) inputs and parameters: a reference rounded once. Not torch in the input's
dtype: torch's own fp32 backward is off by far more than pyfused's (channels_last at
(32, 64, 56, 56): dx by up to 0.26, dbias by 0.53; see bench/batchnorm.py).

Tolerances, per dtype, relative to the largest reference value of each compared tensor (at least 1):
- fp32: 1e-5. Statistics and grad sums accumulate in double; what is left is float rounding of
  the elementwise passes (a few ulps, 2^-24 each) and of the per-channel coefficients.
- fp64: 1e-12: only summation order differs from the reference.
- bf16 / fp16: 2 ulps of the 16-bit type (2 * 2^-8, 2 * 2^-11): the math runs in float and rounds
  once on store, so one ulp from the rounding, one for float's own error on the way.
dx is held to the size of the terms it is a difference of (see run_and_compare).
"""

import torch

from pyfused import nn as pnn

TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2 * 2**-8, torch.float16: 2 * 2**-11}
TORCH = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
OURS = {2: pnn.BatchNorm1d, 3: pnn.BatchNorm1d, 4: pnn.BatchNorm2d, 5: pnn.BatchNorm3d}
OURS_RELU = {2: pnn.BatchNormReLU1d, 3: pnn.BatchNormReLU1d, 4: pnn.BatchNormReLU2d, 5: pnn.BatchNormReLU3d}
CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}

# fp32, both modules, 3 training steps then eval: tiny, one value per channel pair, a prime
# channel count, large spatial extent with a small N, 1d with and without length, 3d.
SHAPES = [(2, 1), (2, 3, 1, 1), (8, 16, 7, 7), (4, 64, 28, 28), (6, 13, 5, 5), (2, 3, 181, 181),
          (256, 33), (5, 7, 3), (3, 4, 70), (4, 3, 2, 3, 5), (1, 2, 65539)]
# Every dtype (16-bit inputs with 16-bit or fp32 params, as under autocast) and both layouts.
LAYOUT_SHAPES = [(8, 16, 7, 7), (2, 3, 1, 1), (3, 5, 4, 4, 4), (2, 64, 11, 13)]
DTYPE_PAIRS = {  # id: (input dtype, parameter dtype)
    "fp32": (torch.float32, torch.float32), "fp64": (torch.float64, torch.float64),
    "bf16": (torch.bfloat16, torch.bfloat16), "fp16": (torch.float16, torch.float16),
    "bf16-fp32-params": (torch.bfloat16, torch.float32), "fp16-fp32-params": (torch.float16, torch.float32),
}
OPTIONS = [dict(momentum=None), dict(momentum=0.3), dict(affine=False), dict(bias=False),
           dict(track_running_stats=False), dict(affine=False, track_running_stats=False), dict(eps=1e-3)]
OPTIONS_SHAPE = (6, 5, 4, 3)


def options_id(options):
    return ",".join(f"{k}={v}" for k, v in options.items())


def allowed(expected, tol, scale=1.0):
    """The largest absolute error allowed: tol times the largest reference value, at least `scale`."""
    return tol * (max(expected.double().abs().max().item(), scale) if expected.numel() else 1.0)


def close(actual, expected, tol, what, scale=1.0):
    bound = allowed(expected, tol, scale)
    err = (actual.double().cpu() - expected.double().cpu()).abs().max().item() if expected.numel() else 0.0
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g} ({tol:.3g} of the largest value or scale)"


def make(shape, dtype, param_dtype, relu, cl, device="cpu", **options):
    """The reference (torch's module in float64, on the CPU) and pyfused's module on `device`,
    both from the same parameters rounded to param_dtype."""
    ndim = len(shape)
    ref = TORCH[ndim](shape[1], **options).double()
    ours = (OURS_RELU if relu else OURS)[ndim](shape[1], **options).to(device, param_dtype)
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


def run_and_compare(ref, ours, shape, dtype, relu, cl, steps=3, tol=None, device="cpu"):
    """`steps` forward (and, in training, backward) passes of both modules on new batches:
    output, dx, the parameters' grads and the buffers, each against the reference."""
    tol = TOL[dtype] if tol is None else tol
    for step in range(steps):
        x = batch(shape, dtype, cl, step)
        xr, xo = x.to(torch.float64, copy=True).requires_grad_(), x.to(device, copy=True).requires_grad_()
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
            yo.backward(grad.to(device))
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
