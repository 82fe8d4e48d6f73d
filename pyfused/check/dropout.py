"""Dropout: statistics and determinism, against the independent Philox of dropout_cases.py.

mask: dropout of SIZES elements for every p of MASK_PS, bit for bit against x * mask * scale with
    the reference mask (a dropped inf is NaN, as in torch), per dtype.
backward: forward and grad equal x * mask * scale and grad * mask * scale, per dtype.
dropout_add / dropout2d: residual + dropout(x + bias), whole channels: the same reference mask.
fraction-p<p>: the dropped count of FRACTION_N elements within SIGMAS binomial standard
    deviations of n * p, for each seed of FRACTION_SEEDS (err/tol is the worst |count - n p| over
    that bound).
seeded: the same seed gives the same mask for every dtype and thread count; two calls give
    different masks; torch.manual_seed replays them.
same-bits-as-cpp (triton): the Triton kernel against the C++ one for the same seed, every dtype.

Every comparison but the fraction's is exact (tolerance 0). The family takes a few seconds on
either backend (the interpreter included), so quick runs all of it.
"""

import contextlib
import warnings

import torch

import pyfused
from pyfused.check import Check
from pyfused.check import dropout_cases as dc
from pyfused.nn import dropout as D
from pyfused.nn import functional as F


def checks(backend, device, quick):
    for dtype in dc.DTYPES:
        yield Check("mask", _name(dtype), lambda errors, dtype=dtype: _mask(errors, device, dtype))
        yield Check("backward", _name(dtype), lambda errors, dtype=dtype: _backward(errors, device, dtype))
        yield Check("dropout_add", _name(dtype), lambda errors, dtype=dtype: _dropout_add(errors, device, dtype))
    yield Check("dropout2d", "fp32", lambda errors: _channels(errors, device))
    for p in dc.FRACTION_PS:
        yield Check(f"fraction-p{p:g}", "fp32", lambda errors, p=p: _fraction(errors, device, p, dc.FRACTION_N))
    yield Check("seeded", "all", lambda errors: _seeded(errors, device, 5 * 16384 + 77))
    if backend == "triton":
        for dtype in dc.DTYPES:
            yield Check("same-bits-as-cpp", _name(dtype), lambda errors, dtype=dtype: _as_cpp(errors, device, dtype))


def _name(dtype):
    return {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _exact(errors, ours, want, what):
    errors.record(ours, want, 0.0, 0.0)
    try:
        dc.assert_same_bits(ours, want)
    except AssertionError as error:
        raise AssertionError(f"{what}: {error}") from None


@contextlib.contextmanager
def _dropped_infs():
    """A dropped inf is inf * 0 = NaN, as in torch; numpy warns about it under the interpreter."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "invalid value encountered in multiply", RuntimeWarning)
        yield


def _mask(errors, device, dtype):
    with _dropped_infs():
        _masks(errors, device, dtype)


def _masks(errors, device, dtype):
    for n in dc.SIZES:
        for p in dc.MASK_PS:
            x = torch.randn(n, dtype=torch.float64, generator=dc.generator(n)).to(dtype)
            x[0] = float("inf")
            ours = F.dropout(x.to(device), p, generator=dc.generator(device=device))
            _exact(errors, ours, dc.expected(x, p, dc.drawn_seed(device=device)), f"n={n} p={p}")


def _backward(errors, device, dtype):
    x = torch.randn(3001, 5, generator=dc.generator(1)).to(device, dtype).requires_grad_()
    y = F.dropout(x, 0.3, generator=dc.generator(device=device))
    grad = torch.randn(3001, 5, generator=dc.generator(2)).to(device, dtype)
    y.backward(grad)
    seed = dc.drawn_seed(device=device)
    _exact(errors, y.detach(), dc.expected(x.detach().cpu(), 0.3, seed), "forward")
    _exact(errors, x.grad, dc.expected(grad.cpu(), 0.3, seed), "grad")


def _dropout_add(errors, device, dtype):
    x, r = (torch.randn(513, 129, generator=dc.generator(s)).to(dtype) for s in (3, 4))
    b = torch.randn(129, generator=dc.generator(5)).to(dtype)
    ours = F.dropout_add(x.to(device), r.to(device), 0.3, bias=b.to(device), generator=dc.generator(device=device))
    _exact(errors, ours, r + dc.expected(x + b, 0.3, dc.drawn_seed(device=device)), "residual + dropout(x + bias)")


def _channels(errors, device):
    x = torch.randn(6, 70, 5, 7, generator=dc.generator(6))
    torch.manual_seed(11)
    ours = F.dropout2d(x.to(device), 0.5)
    torch.manual_seed(11)
    seed = torch.empty(1, dtype=torch.int64, device=device).random_().item()
    _exact(errors, ours, dc.expected(x, 0.5, seed, group=35), "whole channels")


def _fraction(errors, device, p, n):
    bound = dc.fraction_bound(n, p)
    for seed in dc.FRACTION_SEEDS:
        out = F.dropout(torch.ones(n, device=device), p, generator=dc.generator(seed, device))
        dropped = (out == 0).sum().item()
        errors.record(torch.tensor([dropped / n]), torch.tensor([p]), 0.0, bound / n)
        sigmas = abs(dropped - n * p) / bound * dc.SIGMAS
        assert abs(dropped - n * p) < bound, f"seed {seed}: {dropped} of {n} dropped, {sigmas:.1f} sigma from {n * p:g}"


def _seeded(errors, device, n):
    x = torch.randn(n, dtype=torch.float64, generator=dc.generator(7))
    masks = [F.dropout(x.to(device, d), 0.5, generator=dc.generator(device=device)) != 0 for d in dc.DTYPES]
    for d, m in zip(dc.DTYPES, masks):
        _exact(errors, m, masks[0], f"{_name(d)}'s mask against fp32's")
    threads = torch.get_num_threads()
    outs = []
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            outs.append(F.dropout(x.to(device), 0.5, generator=dc.generator(device=device)))
    finally:
        torch.set_num_threads(threads)
    for count, out in zip((2, 3), outs[1:]):
        _exact(errors, out, outs[0], f"{count} threads against 1")
    torch.manual_seed(5)
    first, second = F.dropout(x.to(device), 0.5), F.dropout(x.to(device), 0.5)
    assert not torch.equal(first, second), "two calls gave the same mask"
    torch.manual_seed(5)
    _exact(errors, F.dropout(x.to(device), 0.5), first, "torch.manual_seed's replay")


def _as_cpp(errors, device, dtype):
    for n in dc.SIZES:
        for p in dc.CROSS_BACKEND_PS:
            x = torch.randn(n, dtype=torch.float64, generator=dc.generator(n)).to(dtype)
            x[0] = float("inf")
            seed = 7692698082559361259
            with _dropped_infs():
                ours = D._MaskedScale.apply(x.to(device), torch.tensor([seed], device=device), p, 1, False)
            with pyfused.use_backend("cpp"):
                cpp = D._MaskedScale.apply(x, torch.tensor([seed]), p, 1, False)
            _exact(errors, ours, cpp, f"n={n} p={p}")
