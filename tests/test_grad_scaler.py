"""torch.amp.GradScaler with the pyfused optimizers (C++ backend), through torch's protocol for
fused optimizers: step() gets grad_scale and found_inf, divides the grads by the scale inside
the kernel and stores the unscaled grads back; a step with found_inf != 0 changes nothing.

The scaler's factors are not powers of two (init_scale 1000, growth 1.5, backoff 0.6), so
dividing by the scale and multiplying by its reciprocal round differently: torch's fused
kernels divide, and so must pyfused for p.grad to match bit for bit.
"""

import copy
import math

import pytest
import torch

import pyfused
from pyfused.nn.utils import clip_grad_norm_

SCALER = dict(init_scale=1000.0, growth_factor=1.5, backoff_factor=0.6, growth_interval=3)
STEPS = 30
# step -> [(param index, element, value)]: consecutive skipped steps (3, 4, 5), inf and NaN
# together (19), and overflow on the first step after a growth.
INJECT = {
    3: [(3, 10, math.inf)],
    4: [(1, 0, math.nan)],
    5: [(4, 299, -math.inf)],
    11: [(3, 4096, math.nan)],
    19: [(2, 3, math.inf), (3, 7, math.nan)],
    26: [(3, 0, -math.inf)],
}
SIZES = (0, 1, 7, 4097, 300)

# name: (pyfused and torch kwargs, the torch reference's extra kwargs)
CONFIGS = {
    "Adam": (dict(lr=1e-2, weight_decay=0.01), dict(fused=True)),
    "AdamW": (dict(lr=1e-2, weight_decay=0.1, amsgrad=True), dict(fused=True)),
    "SGD": (dict(lr=0.05, momentum=0.9), dict(fused=True)),
    "Adagrad": (dict(lr=0.1, weight_decay=0.01), dict(fused=True)),
    # torch has no fused RMSprop: its for-loop, which GradScaler unscales in a pass of its own
    "RMSprop": (dict(lr=0.01, momentum=0.5, centered=True), dict(foreach=False)),
    "Adadelta": (dict(lr=0.5, weight_decay=0.01), dict(foreach=False)),  # no fused Adadelta in torch either
}
# pyfused follows torch's for-loop arithmetic (and its roundings); torch's fused CPU kernels group
# the bias corrections and the update differently. Each step differs by a few ulps, and 30 steps
# leave at most about half of rtol = atol = 1e-6 (measured: SGD with momentum is the worst).
RTOL = ATOL = 1e-6


def make_params(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).to(dtype).requires_grad_() for n in SIZES]
    return params, [dict(params=params[:3]), dict(params=params[3:], lr_factor=0.5)]


def groups_for(groups, kwargs):
    return [dict(params=g["params"], lr=kwargs["lr"] * g.get("lr_factor", 1.0)) for g in groups]


def grads_for(step, seed=1, dtype=torch.float32):
    """Unscaled grads of one step; INJECT's values put in after scaling."""
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    return [torch.randn(n, generator=gen).to(dtype) for n in SIZES]


def train(opt, params, steps=STEPS, inject=INJECT, dtype=torch.float32):
    """Returns the scale after each update and p.grad after each step."""
    scaler = torch.amp.GradScaler("cpu", **SCALER)
    scales, grads_after = [], []
    for step in range(steps):
        for p, g in zip(params, grads_for(step, dtype=dtype)):
            p.grad = scaler.scale(g)
        for i, j, v in inject.get(step, ()):
            params[i].grad[j] = v
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        grads_after.append([p.grad.clone() for p in params])
    return scales, grads_after


def same(a, b):
    """Bit for bit, NaN where NaN."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(
        a.nan_to_num(), b.nan_to_num())


def skipped(step, inject=INJECT):
    return step in inject


def assert_states_close(opt, params, ref_opt, ref_params, rtol=RTOL, atol=ATOL):
    for i, (p, r) in enumerate(zip(params, ref_params)):
        torch.testing.assert_close(p, r, rtol=rtol, atol=atol, msg=lambda m: f"param {i}: {m}")
        s, t = opt.state[p], ref_opt.state[r]
        assert s.keys() == t.keys(), (i, s.keys(), t.keys())
        for key in s:
            if key == "step":
                assert torch.equal(s[key], t[key]), (i, s[key], t[key])
            else:
                torch.testing.assert_close(s[key], t[key], rtol=rtol, atol=atol, msg=lambda m: f"{key} of param {i}: {m}")


@pytest.mark.parametrize("name", CONFIGS)
def test_training_matches_torch(name):
    kwargs, torch_kwargs = CONFIGS[name]
    params, groups = make_params()
    ref_params, ref_groups = make_params()
    opt = getattr(pyfused.optim, name)(groups_for(groups, kwargs), **kwargs)
    ref = getattr(torch.optim, name)(groups_for(ref_groups, kwargs), **kwargs, **torch_kwargs)
    scales, grads = train(opt, params)
    ref_scales, ref_grads = train(ref, ref_params)

    assert scales == ref_scales
    assert len(set(scales)) > 3 and min(scales) < SCALER["init_scale"] < max(scales)  # grew and backed off
    # Where torch's optimizer takes GradScaler's fused protocol, it unscales in its kernel by division
    # (skipped steps left scaled), as pyfused does. Elsewhere (the for-loop; torch 2.11's fused
    # Adagrad, which does not declare _step_supports_amp_scaling) GradScaler multiplies by 1/scale
    # in a pass of its own: within an ulp.
    in_kernel = getattr(ref, "_step_supports_amp_scaling", False)
    for step, (ours, theirs) in enumerate(zip(grads, ref_grads)):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            if in_kernel:
                assert same(a, b), f"p.grad {i} after step {step}"
            elif not skipped(step):
                torch.testing.assert_close(a, b, rtol=2.0**-23, atol=0, msg=f"p.grad {i} after step {step}")
    assert_states_close(opt, params, ref, ref_params)
    moved = make_params()[0]
    assert all(not torch.equal(p, q) for p, q in zip(params, moved) if p.numel())


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("name", CONFIGS)
def test_unscaling_in_the_kernel_is_exact_division(name, dtype):
    """Bit for bit: the same optimizer fed grads divided by the scale by hand (torch.div), with the
    skipped steps left out. (16-bit grads differ here by design: the kernel steps with the
    unrounded fp32 quotient, as torch's fused kernels do, and stores the rounded one.)"""
    kwargs, _ = CONFIGS[name]
    params, groups = make_params(dtype=dtype)
    ref_params, ref_groups = make_params(dtype=dtype)
    opt = getattr(pyfused.optim, name)(groups_for(groups, kwargs), **kwargs)
    ref = getattr(pyfused.optim, name)(groups_for(ref_groups, kwargs), **kwargs)
    scales, grads = train(opt, params, dtype=dtype)
    scale = SCALER["init_scale"]
    for step in range(STEPS):
        scaled = [g * torch.tensor(scale) for g in grads_for(step, dtype=dtype)]  # GradScaler.scale's product
        for p, g in zip(ref_params, scaled):
            p.grad = torch.div(g, torch.tensor(scale, dtype=torch.float32))
        if not skipped(step):
            ref.step()
            for i, (a, b) in enumerate(zip(grads[step], ref_params)):
                assert same(a, b.grad), f"p.grad {i} after step {step}"
        scale = scales[step]
    assert_states_close(opt, params, ref, ref_params, rtol=0, atol=0)


# Every state a kernel keeps: momentum buffers, amsgrad's max, centered RMSprop's grad average.
SKIP_CONFIGS = [
    ("Adam", dict(lr=1e-2, amsgrad=True, weight_decay=0.1, maximize=True)),
    ("AdamW", dict(lr=1e-2)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.5)),
    ("SGD", dict(lr=0.1)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.01)),
    ("RMSprop", dict(lr=0.01, momentum=0.9, centered=True)),
    ("Adadelta", dict(lr=0.5, rho=0.5, weight_decay=0.1, maximize=True)),
]


def snapshot(opt, params):
    return [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())


def assert_unchanged(before, opt, params):
    old_params, old_state = before
    for i, (a, b) in enumerate(zip(old_params, params)):
        assert torch.equal(a, b), f"param {i} moved"
    new_state = opt.state_dict()
    assert old_state["state"].keys() == new_state["state"].keys()
    for index, state in old_state["state"].items():
        assert state.keys() == new_state["state"][index].keys()
        for key, value in state.items():
            now = new_state["state"][index][key]
            assert type(value) is type(now)
            if isinstance(value, torch.Tensor):
                assert value.dtype == now.dtype and torch.equal(value, now), f"{key} of param {index} changed"
            else:
                assert value == now, f"{key} of param {index} changed"


@pytest.mark.parametrize("value", (math.inf, -math.inf, math.nan), ids=str)
@pytest.mark.parametrize("name,kwargs", SKIP_CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SKIP_CONFIGS)])
@pytest.mark.parametrize("backend", ("cpp", "torch"))
def test_found_inf_step_changes_nothing(name, kwargs, value, backend):
    """After three real steps, a step with one bad element leaves every param and state tensor
    (step counts, momentum buffers) bit-identical; the grads stay scaled, as torch's do."""
    params, groups = make_params()
    opt = getattr(pyfused.optim, name)(groups_for(groups, kwargs), **kwargs)
    scaler = torch.amp.GradScaler("cpu", **SCALER)
    with pyfused.use_backend(backend):
        for step in range(3):
            for p, g in zip(params, grads_for(step)):
                p.grad = scaler.scale(g)
            scaler.step(opt)
            scaler.update()
        before = snapshot(opt, params)
        for p, g in zip(params, grads_for(3)):
            p.grad = scaler.scale(g)
        params[3].grad[1234] = value
        scaled = [p.grad.clone() for p in params]
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
    assert_unchanged(before, opt, params)
    assert all(same(p.grad, g) for p, g in zip(params, scaled))
    assert scaler.get_scale() == scale * SCALER["backoff_factor"]
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


@pytest.mark.parametrize("name,kwargs", SKIP_CONFIGS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SKIP_CONFIGS)])
def test_skipped_first_step_is_as_if_it_never_happened(name, kwargs):
    """Overflow on the very first step (state not yet created): the following steps equal a run
    without that step, bit for bit (SGD's fresh momentum buffer starts as the first real grad)."""
    params, groups = make_params()
    opt = getattr(pyfused.optim, name)(groups_for(groups, kwargs), **kwargs)
    scales, _ = train(opt, params, steps=6, inject={0: [(2, 0, math.nan)], 1: [(3, 5, math.inf)]})
    assert scales[1] < scales[0] < SCALER["init_scale"]
    # The reference: steps 2-5 alone, from the scale the two skipped steps leave behind.
    ref_params, ref_groups = make_params()
    ref = getattr(pyfused.optim, name)(groups_for(ref_groups, kwargs), **kwargs)
    scaler = torch.amp.GradScaler("cpu", **{**SCALER, "init_scale": scales[1]})
    for step in range(2, 6):
        for p, g in zip(ref_params, grads_for(step)):
            p.grad = scaler.scale(g)
        scaler.step(ref)
        scaler.update()
    assert_states_close(opt, params, ref, ref_params, rtol=0, atol=0)


@pytest.mark.parametrize("how", ("use_backend", "env"))
@pytest.mark.parametrize("name", CONFIGS)
def test_torch_backend_under_grad_scaler(name, how, monkeypatch):
    """PYFUSED_BACKEND=torch (torch's for-loop, grads divided by the scale with _foreach_div_
    first) against the C++ kernels: p.grad bit for bit, params and states within RTOL."""
    kwargs, _ = CONFIGS[name]
    params, groups = make_params()
    ref_params, ref_groups = make_params()
    opt = getattr(pyfused.optim, name)(groups_for(groups, kwargs), **kwargs)
    ref = getattr(pyfused.optim, name)(groups_for(ref_groups, kwargs), **kwargs)
    scales, grads = train(opt, params)
    if how == "env":
        monkeypatch.setenv("PYFUSED_BACKEND", "torch")
        ref_scales, ref_grads = train(ref, ref_params)
    else:
        with pyfused.use_backend("torch"):
            ref_scales, ref_grads = train(ref, ref_params)
    assert scales == ref_scales
    for step, (ours, theirs) in enumerate(zip(grads, ref_grads)):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert same(a, b), f"p.grad {i} after step {step}"
    assert_states_close(opt, params, ref, ref_params)
    # and the torch backend is torch's own for-loop optimizer
    torch_params, torch_groups = make_params()
    torch_ref = getattr(torch.optim, name)(groups_for(torch_groups, kwargs), **kwargs, foreach=False)
    train(torch_ref, torch_params)
    for a, b in zip(ref_params, torch_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def amp_clip_training(opt, params, fused, torch_clip=False, steps=12):
    """The AMP recipe: scale, backward, unscale_, clip, step, update; returns p.grad after each step."""
    scaler = torch.amp.GradScaler("cpu", **SCALER)
    inject = {2: [(3, 5, math.inf)], 3: [(1, 0, math.nan)], 7: [(2, 1, math.inf)]}
    out = []
    for step in range(steps):
        for p, g in zip(params, grads_for(step)):
            p.grad = scaler.scale(g * (1 + step % 3))
        for i, j, v in inject.get(step, ()):
            params[i].grad[j] = v
        scaler.unscale_(opt)
        if torch_clip:
            torch.nn.utils.clip_grad_norm_(params, 30.0)
        else:
            clip_grad_norm_(params, 30.0, optimizer=opt if fused else None)
        scaler.step(opt)
        scaler.update()
        out.append([p.grad.clone() for p in params])
    return out, inject


def test_amp_recipe_with_fused_clipping():
    """unscale_ + clip_grad_norm_(optimizer=) + step equals unscale_ + clip + step bit for bit (the
    skipped steps consume the deferred coefficient, which is NaN or 0 there), and torch's fused
    Adam with torch's clipping within RTOL."""
    params, groups = make_params()
    ref_params, ref_groups = make_params()
    torch_params, torch_groups = make_params()
    kwargs = dict(lr=1e-2)
    opt = pyfused.optim.Adam(groups_for(groups, kwargs), **kwargs)
    ref = pyfused.optim.Adam(groups_for(ref_groups, kwargs), **kwargs)
    torch_opt = torch.optim.Adam(groups_for(torch_groups, kwargs), fused=True, **kwargs)
    grads, inject = amp_clip_training(opt, params, fused=True)
    amp_clip_training(ref, ref_params, fused=False)
    amp_clip_training(torch_opt, torch_params, fused=False, torch_clip=True)
    assert_states_close(opt, params, ref, ref_params, rtol=0, atol=0)
    assert_states_close(opt, params, torch_opt, torch_params)
    for step in range(len(grads)):  # unscaled by unscale_, never clipped in place
        if step not in inject:
            expected = [g * (1 + step % 3) for g in grads_for(step)]
            assert all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(grads[step], expected))


def test_scaled_and_clipped_step_stores_only_the_unscaled_grads():
    p = torch.ones(4, requires_grad=True)
    opt = pyfused.optim.SGD([p], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    p.grad = scaler.scale(torch.full((4,), 2.0))  # 8.0: clipped without unscale_ first
    clip_grad_norm_([p], 0.5, optimizer=opt)  # norm 16: coefficient 0.5 / (16 + 1e-6)
    scaler.step(opt)
    assert torch.allclose(p.detach(), torch.full((4,), 1 - 0.1 * 2.0 * 0.5 / (16 + 1e-6)))  # the step is right
    assert torch.equal(p.grad, torch.full((4,), 2.0))  # unscaled, as torch's fused step stores it
