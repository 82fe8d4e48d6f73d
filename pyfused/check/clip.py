"""Global-norm clipping: the test suite's tables (clip_cases.py) against torch.

norm-<shapes>: get_total_norm for every norm type of NORM_TYPES over the grads of SHAPES; max,
    min and the p = 0 count bit for bit with torch.nn.utils.get_total_norm, the others against
    the float64 norm of the stored elements at clip_cases.norm_rtol (torch's own is further off).
fused-<optimizer>: clip_grad_norm_(optimizer=...) then a pyfused step, against
    torch.nn.utils.clip_grad_norm_ then torch's for-loop step, 12 steps of which about half clip;
    params and every state tensor at the relative tolerance of torch's norm (TOLERANCES[dtype][1]:
    its norm, hence its clip coefficient, differs from the exact one by up to that much).

quick: the norms without the 1e6-element grads; fused clipping in fp32 only. Under the Triton
interpreter (~0.15 s per program) the norms take the one- and three-tensor shapes, and fused
clipping runs Adam for 4 steps.
"""

import warnings

import torch

from pyfused.check import Check
from pyfused.check import clip_cases as cc
from pyfused.nn.utils import clip_grad_norm_, get_total_norm


def checks(backend, device, quick):
    interpreted = backend == "triton" and device.type == "cpu"
    shapes = {k: cc.SHAPES[k] for k in ("one", "three")} if interpreted else dict(cc.SHAPES)
    for dtype in cc.DTYPES:
        for name, shape_list in shapes.items():
            yield Check(f"norm-{name}", _name(dtype), _norms(backend, device, dtype, shape_list))
        if not quick and not interpreted and dtype in (torch.float32, torch.bfloat16):
            yield Check("norm-1M", _name(dtype), _norms(backend, device, dtype, cc.BIG))
    for dtype in (torch.float32,) if quick or interpreted else (torch.float32, torch.float64):
        for optimizer in ("Adam",) if interpreted else cc.FUSED:
            steps = 4 if interpreted else 12
            yield Check(f"fused-{optimizer}", _name(dtype), _fused(optimizer, device, dtype, steps))


def _name(dtype):
    return {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _norms(backend, device, dtype, shapes):
    def run(errors):
        with warnings.catch_warnings():
            # log2(0) in the masked lanes of |x|^p: harmless (exp2(-inf) = 0); numpy warns under the interpreter
            warnings.filterwarnings("ignore", "divide by zero encountered in log2", RuntimeWarning)
            _norm_types(backend, device, dtype, shapes, errors)

    return run


def _norm_types(backend, device, dtype, shapes, errors):
    everything = [t.to(device) for t in cc.make(shapes, dtype)]
    for p in cc.NORM_TYPES:
        tensors = everything
        if p in (cc.INF, -cc.INF):  # torch raises on an empty tensor there (the suite checks the message)
            tensors = [t for t in everything if t.numel()]
        ours = get_total_norm(tensors, p)
        assert ours.dtype == dtype and ours.shape == (), f"p={p}: a {ours.dtype} {tuple(ours.shape)} result"
        if p in cc.EXACT_NORM_TYPES:
            theirs = torch.nn.utils.get_total_norm(tensors, p)
            errors.record(ours, theirs, 0.0, 0.0)
            assert torch.equal(ours.cpu(), theirs.cpu()), f"p={p}: {float(ours)!r} != torch's {float(theirs)!r}"
            continue
        ref = cc.reference(tensors, p)
        rtol = cc.norm_rtol(backend, dtype, p)
        overflow = bool(ref.to(dtype).isinf())  # fp16: the total overflows, torch's is inf too
        errors.record(ours, ref.to(dtype) if overflow else ref, rtol, 0.0)
        if overflow:
            assert ours.isinf(), f"p={p}: {float(ours)!r} where the total overflows {dtype}"
            continue
        a, e = float(ours), float(ref)
        assert abs(a - e) <= rtol * abs(e), f"p={p}: {a!r} vs float64 {e!r} (rel {abs(a - e) / abs(e):.3g} > {rtol})"


def _on(device, params, groups):
    moved = [p.detach().to(device).requires_grad_() for p in params]
    index = {id(p): i for i, p in enumerate(params)}
    return moved, [{**g, "params": [moved[index[id(p)]] for p in g["params"]]} for g in groups]


def _fused(optimizer, device, dtype, steps):
    import pyfused

    kwargs = cc.FUSED[optimizer]
    rtol = cc.TOLERANCES[dtype][1]

    def run(errors):
        params, groups, grads = cc.training(optimizer, kwargs, dtype, n_steps=steps)
        params, groups = _on(device, params, groups)
        ref_params, ref_groups, _ = cc.training(optimizer, kwargs, dtype, n_steps=steps)
        ref_params, ref_groups = _on(device, ref_params, ref_groups)
        ours = getattr(pyfused.optim, optimizer)(groups, **kwargs)
        theirs = getattr(torch.optim, optimizer)(ref_groups, **kwargs, foreach=False)
        clipped = 0
        for step_grads in grads:
            for ps in (params, ref_params):
                for p, g in zip(ps, step_grads):
                    p.grad = None if g is None else g.to(device, copy=True)  # torch clips its grads in place
            norm = clip_grad_norm_(params, 20.0, optimizer=ours)
            torch.nn.utils.clip_grad_norm_(ref_params, 20.0)
            clipped += float(norm) > 20.0
            ours.step()
            theirs.step()
        assert 0 < clipped < steps, f"{clipped} of {steps} steps clipped: the case tests nothing"
        for i, (a, b) in enumerate(zip(params, ref_params)):
            errors.record(a, b, rtol, rtol)
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol, msg=lambda m, i=i: f"param {i}: {m}")
            for key, t in theirs.state[b].items():
                if key != "step":
                    errors.record(ours.state[a][key], t, rtol, rtol)
                    torch.testing.assert_close(ours.state[a][key], t, rtol=rtol, atol=rtol,
                                               msg=lambda m, i=i, key=key: f"param {i} state {key!r}: {m}")

    return run
