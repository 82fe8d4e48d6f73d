"""The Triton batch norm kernels (interpreted on CPU without a GPU) against torch in float64 and
against the C++ backend. Tolerances: as in tests/test_batchnorm.py (fp32 1e-5, fp64 1e-12, 16-bit
2 ulps); against C++ they share partitions and merge order, so they agree to the rounding of
the few lane sums that the two sum in a different order, and of the C++ rows walk's opmath
blocks of 8 rows (csrc/batchnorm.h, kBlock: within 9 * 2^-24 of the variance, so 1e-6 fp32,
1e-13 fp64, 1 ulp 16-bit)."""

import pytest
import torch

import pyfused
from pyfused import nn as pnn
from triton_suite import DEVICE

CPP_TOL = {torch.float32: 1e-6, torch.float64: 1e-13, torch.bfloat16: 2**-8, torch.float16: 2**-11}
REF_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2 * 2**-8, torch.float16: 2 * 2**-11}
MODULES = {2: (pnn.BatchNorm1d, pnn.BatchNormReLU1d, torch.nn.BatchNorm1d),
           3: (pnn.BatchNorm1d, pnn.BatchNormReLU1d, torch.nn.BatchNorm1d),
           4: (pnn.BatchNorm2d, pnn.BatchNormReLU2d, torch.nn.BatchNorm2d),
           5: (pnn.BatchNorm3d, pnn.BatchNormReLU3d, torch.nn.BatchNorm3d)}


def close(actual, expected, tol, what, scale=1.0):
    scale = max(expected.double().abs().max().item(), scale)
    err = (actual.double().cpu() - expected.double().cpu()).abs().max().item()
    assert err <= tol * scale, f"{what}: {err:.3g} > {tol:.3g} * {scale:.3g}"


def run(module, x, grad, backend):
    xx = x.clone().requires_grad_()
    with pyfused.use_backend(backend):
        y = module(xx)
        y.backward(grad)
    return [y, xx.grad] + [p.grad for p in module.parameters()] + list(module.buffers())


FP32, FP64, BF16, FP16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
# (shape, channels_last, input dtype, parameter dtype, relu): each walk (planar, rows), layout and
# dtype at least once, kept small (the interpreter runs every program in Python).
CASES = [((2, 3, 1, 1), False, FP32, FP32, False), ((4, 6, 7, 7), False, FP32, FP32, True),
         ((4, 6, 7, 7), True, FP32, FP32, False), ((2, 3, 4100), False, FP32, FP32, False),
         ((40, 33), False, FP32, FP32, True), ((5, 7, 3), False, FP64, FP64, False),
         ((2, 3, 2, 3, 5), True, BF16, BF16, True), ((3, 5, 6, 6), False, FP16, FP32, False),
         ((3, 5, 6, 6), True, BF16, FP32, True), ((4, 6, 7, 7), False, FP64, FP64, True)]


@pytest.mark.parametrize("shape,cl,dtype,param_dtype,relu", CASES,
                         ids=[f"{s}-{str(d)[6:]}-{str(p)[6:]}{'-cl' if c else ''}{'-relu' if r else ''}"
                              for s, c, d, p, r in CASES])
def test_triton_matches_cpp_and_torch(shape, cl, dtype, param_dtype, relu):
    ours, ours_relu, reference = MODULES[len(shape)]
    kind = ours_relu if relu else ours
    gen = torch.Generator().manual_seed(0)
    ref = reference(shape[1]).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5, generator=gen)
        ref.bias.uniform_(-1, 1, generator=gen)
    cpp, tri = kind(shape[1]).to(param_dtype), kind(shape[1]).to(DEVICE, param_dtype)
    cpp.load_state_dict(ref.state_dict()), tri.load_state_dict(ref.state_dict())
    ref.load_state_dict(cpp.state_dict())
    for step, training in enumerate((True, True, False)):
        for m in (ref, cpp, tri):
            m.train(training)
        if not training:  # eval normalizes with the running stats: the reference takes ours, rounded
            ref.load_state_dict(cpp.state_dict())
        x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 1).to(dtype)
        grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
        if cl:
            fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
            x, grad = x.to(memory_format=fmt), grad.to(memory_format=fmt)
        for m in (ref, cpp, tri):
            for p in m.parameters():
                p.grad = None
        got_cpp = run(cpp, x, grad, "cpp")
        got_tri = run(tri, x.to(DEVICE), grad.to(DEVICE), "triton")
        xr = x.to(torch.float64, copy=True).requires_grad_()
        yr = ref(xr)
        yr = torch.relu(yr) if relu else yr
        yr.backward(grad.double())
        want = [yr, xr.grad] + [p.grad for p in ref.parameters()] + list(ref.buffers())
        dims = [d for d in range(len(shape)) if d != 1]
        invstd = (x.double().var(dim=dims, unbiased=False) + 1e-5).rsqrt().max().item()
        dx_scale = grad.double().abs().max().item() * ref.weight.abs().max().item() * invstd
        names = ["output", "dx", "dweight", "dbias", "running_mean", "running_var", "num_batches_tracked"]
        for name, c, t, w in zip(names, got_cpp, got_tri, want):
            scale = dx_scale if name == "dx" else 1.0
            close(t, c, CPP_TOL[dtype], f"step {step} {name} triton vs cpp", scale)
            close(t, w, REF_TOL[dtype], f"step {step} {name} triton vs torch", scale)
        if cl:
            assert got_tri[0].is_contiguous(memory_format=fmt) and got_tri[1].is_contiguous(memory_format=fmt)


def test_gradcheck_fp64():
    """BatchNormReLU in training (it covers batch norm's math and the mask); small, fast mode:
    every call runs the interpreter."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 2, dtype=torch.float64, generator=gen).to(DEVICE).requires_grad_()
    w = (torch.rand(2, dtype=torch.float64, generator=gen) + 0.5).to(DEVICE).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, generator=gen).to(DEVICE).requires_grad_()

    def fn(x, w, b):
        return pyfused.nn.batchnorm.batch_norm(x, None, None, w, b, True, 0.1, 1e-5, relu=True)

    assert torch.autograd.gradcheck(fn, (x, w, b), fast_mode=True)
