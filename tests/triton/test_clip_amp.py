"""Global-norm clipping and GradScaler on the Triton backend, against the C++ backend.

The norm: both sum the same p-th powers, but over different reduction trees (C++: 16 lanes per
16384-element chunk, in order; Triton: BLOCK lanes per chunk, then tl.reduce's tree), and Triton
takes |x|^p as exp2(p log2 |x|) where C++ calls pow(). So the totals are not equal bit for bit:
max and min (and the p = 0 count) are. fp32 sums: the interpreter's tl.reduce with a custom
combine folds the 4096 lanes one after the other in fp32 (compiled, it is a tree), ~sqrt(4096) *
2^-24 = 4e-6 relative on the powered sum (2e-6 measured for p = 0.5, C++ 1e-7), and the root
scales a relative error by 1/p: so 4e-6 * max(1, 1/p), not "a few ulps". fp64 within 1e-13;
16-bit results are both the total rounded once to the dtype, equal unless the total lies within
the fp32 error of a rounding boundary, so one ulp is allowed.

The optimizer step: both divide the grad by the scale, then multiply by the clip coefficient,
in opmath, in that order, without FMA; so GradScaler and fused clipping are bit for bit, given
the same coefficient (the norm must then be exact in both: dyadic grads make it so).

Sizes stay small: under the interpreter each norm program costs ~0.15 s (0.3 s for max / min).
"""

import math

import pytest
import torch

import pyfused
from triton_suite import DEVICE
from pyfused.check.clip_cases import TRITON_RTOL as RTOL
from pyfused.nn.utils import clip_grad_norm_, clip_grads_with_norm_, get_total_norm

INF = math.inf
NORM_TYPES = (INF, -INF, 0.0, 1.0, 2.0, 3.0, 0.5)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# log2(0) in the masked lanes of |x|^p: harmless (exp2(-inf) = 0), numpy warns under the interpreter
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")


def make(sizes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(dtype) for n in sizes]


def both_norms(tensors, p):
    with pyfused.use_backend("cpp"):
        cpp = get_total_norm(tensors, p)
    triton = get_total_norm([t.to(DEVICE) for t in tensors], p)
    assert triton.device.type == DEVICE.type
    return cpp, triton.cpu()


@pytest.mark.parametrize("p", NORM_TYPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_norm_matches_cpp(dtype, p):
    tensors = make((7, 16385), dtype)  # a small tensor and one over a chunk edge: 3 programs
    cpp, triton = both_norms(tensors, p)
    assert cpp.dtype == triton.dtype == dtype
    if p in (INF, -INF, 0.0):
        assert torch.equal(cpp, triton), (cpp, triton)
    else:
        if math.isinf(float(cpp)):  # fp16, p = 0.5: the total overflows fp16 in both
            assert math.isinf(float(triton))
            return
        rtol = RTOL[dtype] * max(1.0, 1.0 / p)
        assert abs(float(cpp) - float(triton)) <= rtol * abs(float(cpp)), (float(cpp), float(triton))
        ref = torch.linalg.vector_norm(torch.cat([t.double() for t in tensors]), p)
        if dtype in (torch.float32, torch.float64):  # and Triton near the float64 truth
            assert abs(float(triton) - float(ref)) <= rtol * float(ref)


@pytest.mark.parametrize("p", [p for p in NORM_TYPES if p != 0], ids=str)
@pytest.mark.parametrize("case", ("inf", "nan", "inf_and_nan"))
def test_triton_nonfinite_norm_matches_cpp(case, p):
    t = make((301,), torch.float32)[0]
    if "inf" in case:
        t[17] = -INF
    if "nan" in case:
        t[300] = math.nan
    cpp, triton = both_norms([t], p)
    assert bool(cpp.isnan()) == bool(triton.isnan())
    assert bool(cpp.isnan()) or float(cpp) == float(triton)  # inf, or a finite min: exact
    assert bool(cpp.isnan()) == ("nan" in case)


def test_triton_empty_inputs():
    assert torch.equal(get_total_norm([]), torch.tensor(0.0))
    zero = torch.zeros(0, device=DEVICE)
    assert float(get_total_norm([zero, zero], 2.0)) == 0.0


SCALER = dict(init_scale=1000.0, growth_factor=1.5, backoff_factor=0.6, growth_interval=2)
INJECT = {2: [(1, 5, INF)], 3: [(0, 0, math.nan)], 7: [(2, 299, -INF)]}
OPTIMIZERS = {
    "Adam": dict(lr=1e-2, amsgrad=True, weight_decay=0.01),
    "AdamW": dict(lr=1e-2),
    "SGD": dict(lr=0.05, momentum=0.9, nesterov=True),
    "Adagrad": dict(lr=0.1),
    "RMSprop": dict(lr=0.01, momentum=0.5, centered=True),
    "Adadelta": dict(lr=0.5, weight_decay=0.01),
}


def scaler_run(name, backend, steps=10):
    """Params, states, the scales and p.grad after each step, on the CPU."""
    device = torch.device("cpu") if backend == "cpp" else DEVICE
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen).to(device).requires_grad_() for n in (7, 4097, 300)]
    opt = getattr(pyfused.optim, name)(params, **OPTIMIZERS[name])
    scaler = torch.amp.GradScaler(device.type, **SCALER)
    scales, grads = [], []
    with pyfused.use_backend(backend):
        for step in range(steps):
            for p in params:
                p.grad = scaler.scale(torch.randn(p.shape, generator=gen).to(device))
            for i, j, v in INJECT.get(step, ()):
                params[i].grad[j] = v
            scaler.step(opt)
            scaler.update()
            scales.append(scaler.get_scale())
            grads.append([p.grad.cpu() for p in params])
    states = [{k: v.cpu() for k, v in opt.state[p].items()} for p in params]
    return [p.detach().cpu() for p in params], states, scales, grads


def same(a, b):
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_grad_scaler_bit_for_bit_with_cpp(name):
    cpp = scaler_run(name, "cpp")
    tri = scaler_run(name, "triton")
    assert cpp[2] == tri[2] and len(set(cpp[2])) > 2  # same schedule; the scale moved both ways
    for step, (a, b) in enumerate(zip(cpp[3], tri[3])):
        assert all(same(x, y) for x, y in zip(a, b)), f"p.grad after step {step}"
    for i, (a, b) in enumerate(zip(cpp[0], tri[0])):
        assert torch.equal(a, b), f"param {i}: {int((a != b).sum())} elements differ"
    for i, (a, b) in enumerate(zip(cpp[1], tri[1])):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{key} of param {i}"


def dyadic_grads(gen, shapes, device):
    """k / 16 with |k| <= 64: every power sum below is exact in fp32, so both norms are too."""
    return [(torch.randint(-64, 65, s, generator=gen).float() / 16).to(device) for s in shapes]


def fused_clip_run(name, backend, norm_type, steps=4, given_norm=False):
    device = torch.device("cpu") if backend == "cpp" else DEVICE
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(n, generator=gen).to(device).requires_grad_() for n in (7, 4097)]
    opt = getattr(pyfused.optim, name)(params, **OPTIMIZERS[name])
    norms = []
    with pyfused.use_backend(backend):
        for step in range(steps):
            grads = dyadic_grads(gen, [p.shape for p in params], device)
            for p, g in zip(params, grads):
                p.grad = g.clone()
            if given_norm:
                clip_grads_with_norm_(params, 3.0, torch.tensor(7.25 + step, device=device), optimizer=opt)
            else:
                norms.append(clip_grad_norm_(params, 3.0, norm_type, optimizer=opt).cpu())
            opt.step()
            assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))  # left unclipped
    states = [{k: v.cpu() for k, v in opt.state[p].items()} for p in params]
    return [p.detach().cpu() for p in params], states, norms


@pytest.mark.parametrize("name,norm_type", [("Adam", 2.0), ("AdamW", 1.0), ("SGD", INF), ("RMSprop", 2.0)])
def test_fused_clipping_bit_for_bit_with_cpp(name, norm_type):
    cpp = fused_clip_run(name, "cpp", norm_type)
    tri = fused_clip_run(name, "triton", norm_type)
    assert all(torch.equal(a, b) for a, b in zip(cpp[2], tri[2])), (cpp[2], tri[2])  # exact norms
    assert all(float(n) > 3.0 for n in cpp[2])  # every step clipped
    for i, (a, b) in enumerate(zip(cpp[0], tri[0])):
        assert torch.equal(a, b), f"param {i}: {int((a != b).sum())} elements differ"
    for a, b in zip(cpp[1], tri[1]):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ("Adam", "SGD"))
def test_fused_clipping_with_given_norm_bit_for_bit_with_cpp(name):
    cpp = fused_clip_run(name, "cpp", 2.0, steps=3, given_norm=True)
    tri = fused_clip_run(name, "triton", 2.0, steps=3, given_norm=True)
    for a, b in zip(cpp[0], tri[0]):
        assert torch.equal(a, b)


def amp_clip_run(backend, steps=6):
    """unscale_, clip_grad_norm_(optimizer=), step: a power-of-two scale keeps the unscaled
    dyadic grads exact, so the two backends' norms are equal."""
    device = torch.device("cpu") if backend == "cpp" else DEVICE
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(n, generator=gen).to(device).requires_grad_() for n in (7, 300)]
    opt = pyfused.optim.Adam(params, lr=1e-2)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**12, growth_interval=2)
    with pyfused.use_backend(backend):
        for step in range(steps):
            for p, g in zip(params, dyadic_grads(gen, [p.shape for p in params], device)):
                p.grad = scaler.scale(g)
            if step in (1, 2):
                params[step - 1].grad[3] = INF if step == 1 else math.nan
            scaler.unscale_(opt)
            clip_grad_norm_(params, 3.0, optimizer=opt)
            scaler.step(opt)
            scaler.update()
    return [p.detach().cpu() for p in params], [opt.state[p]["exp_avg_sq"].cpu() for p in params], scaler.get_scale()


def test_amp_recipe_with_fused_clipping_bit_for_bit_with_cpp():
    cpp = amp_clip_run("cpp")
    tri = amp_clip_run("triton")
    assert cpp[2] == tri[2]
    assert all(torch.equal(a, b) for a, b in zip(cpp[0] + cpp[1], tri[0] + tri[1]))


def test_scaled_and_clipped_step_stores_only_the_unscaled_grads():
    p = torch.ones(4, device=DEVICE, requires_grad=True)
    opt = pyfused.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=4.0)
    p.grad = scaler.scale(torch.full((4,), 2.0, device=DEVICE))  # 8.0, clipped without unscale_
    clip_grad_norm_([p], 0.5, optimizer=opt)  # norm 16
    scaler.step(opt)
    assert torch.allclose(p.detach().cpu(), torch.tensor(1 - 0.1 * 2.0 * 0.5 / (16 + 1e-6)))
    assert torch.equal(p.grad.cpu(), torch.full((4,), 2.0))
