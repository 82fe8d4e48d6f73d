"""pyfused.nn.utils' clipping against torch.nn.utils' (C++ backend).

The norms: pyfused accumulates in fp32 lanes (fp64 for fp64 grads) and sums the chunk partials in
double, rounding once at the end; torch rounds each tensor's norm to the grads' dtype and then
takes the norm of the norms, accumulating in fp32. pyfused is therefore usually the more accurate
of the two, so both are compared against a float64 reference computed from the same (already
rounded) elements: pyfused with a tight tolerance, torch with the looser one its method needs.
Max, min and the p = 0 count are exact in both and compared bit for bit.

Fused clipping (optimizer=): the coefficient is computed by the same torch ops as
torch.nn.utils.clip_grads_with_norm_, and the kernel multiplies it into each fp32 grad as torch's
_foreach_mul_ does (one fp32 rounding), so the result equals clip-then-step bit for bit.
"""

import math
import warnings

import pytest
import torch

import pyfused
from pyfused.check.clip_cases import BIG, DTYPES, FUSED, INF, NORM_TYPES, SHAPES, TOLERANCES, make, reference, training
from pyfused.nn.utils import clip_grad_norm_, clip_grads_with_norm_, get_total_norm


def assert_close_rel(actual, expected, rtol, what):
    a, e = float(actual), float(expected)
    assert abs(a - e) <= rtol * abs(e), f"{what}: {a!r} vs float64 {e!r} (rel {abs(a - e) / abs(e):.3g} > {rtol})"


def has_empty(tensors):
    return any(t.numel() == 0 for t in tensors)


def norm_cases():
    for dtype in DTYPES:
        for name, shapes in SHAPES.items():
            yield pytest.param(dtype, shapes, id=f"{str(dtype)[6:]}-{name}")
    for dtype in (torch.float32, torch.bfloat16):
        yield pytest.param(dtype, BIG, id=f"{str(dtype)[6:]}-1M")


@pytest.mark.parametrize("p", NORM_TYPES, ids=str)
@pytest.mark.parametrize("dtype,shapes", list(norm_cases()))
def test_total_norm_matches_torch(dtype, shapes, p):
    tensors = make(shapes, dtype)
    if p in (INF, -INF) and has_empty(tensors):
        tensors = [t for t in tensors if t.numel()]  # torch raises there: see the test below
    ours = get_total_norm(tensors, p)
    theirs = torch.nn.utils.get_total_norm(tensors, p)
    assert ours.dtype == theirs.dtype == dtype
    assert ours.shape == theirs.shape == ()
    if p in (INF, -INF, 0.0):  # exact in both
        assert torch.equal(ours, theirs), (ours, theirs)
        if p != 0:
            assert float(ours) == float(reference(tensors, p))
        return
    ref = reference(tensors, p)
    if not math.isfinite(float(ref.to(dtype))):  # fp16 overflow: the total is inf in both
        assert math.isinf(float(ours)) and math.isinf(float(theirs))
        return
    ours_tol, torch_tol = TOLERANCES[dtype]
    assert_close_rel(ours, ref, ours_tol, "pyfused")
    assert_close_rel(theirs, ref, torch_tol, "torch")


def test_fp16_overflow_is_inf_in_both():
    """1e6 elements of fp16 have a 1-norm far above 65504: both round the total to inf."""
    tensors = make(BIG, torch.float16)
    assert math.isinf(float(get_total_norm(tensors, 1.0)))
    assert math.isinf(float(torch.nn.utils.get_total_norm(tensors, 1.0)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", NORM_TYPES, ids=str)
def test_single_tensor_and_string_norm_type(dtype, p):
    t = make([(33,)], dtype)[0]
    for norm_type in (p, str(p)):  # torch takes anything float() takes, 'inf' included
        ours = get_total_norm(t, norm_type)
        theirs = torch.nn.utils.get_total_norm(t, norm_type)
        assert ours.dtype == theirs.dtype == dtype
        if p in (INF, -INF, 0.0):
            assert torch.equal(ours, theirs)
        else:
            assert_close_rel(ours, reference([t], p), TOLERANCES[dtype][0], "pyfused")
            assert_close_rel(theirs, reference([t], p), TOLERANCES[dtype][1], "torch")


@pytest.mark.parametrize("p", (INF, -INF), ids=str)
def test_empty_tensor_with_inf_norm_raises_torchs_message(p):
    tensors = [torch.randn(3), torch.empty(0)]
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.get_total_norm(tensors, p)
    with pytest.raises(RuntimeError) as ours:
        get_total_norm(tensors, p)
    assert str(ours.value) == str(theirs.value)
    params = [torch.zeros(3, requires_grad=True), torch.zeros(0, requires_grad=True)]
    for param, grad in zip(params, tensors):
        param.grad = grad.clone()
    with pytest.raises(RuntimeError) as clipped:
        clip_grad_norm_(params, 1.0, p)
    assert str(clipped.value) == str(theirs.value)


@pytest.mark.parametrize("p", NORM_TYPES, ids=str)
def test_empty_inputs(p):
    """An empty list, all-None grads and a lone empty grad (finite p) are torch's zero."""
    for tensors in ([], ()):
        ours, theirs = get_total_norm(tensors, p), torch.nn.utils.get_total_norm(tensors, p)
        assert torch.equal(ours, theirs) and ours.dtype == theirs.dtype == torch.float32
    params = [torch.zeros(4, requires_grad=True) for _ in range(3)]
    ours = clip_grad_norm_(params, 1.0, p)
    theirs = torch.nn.utils.clip_grad_norm_(params, 1.0, p)
    assert torch.equal(ours, theirs) and ours.dtype == theirs.dtype and float(ours) == 0.0
    assert all(param.grad is None for param in params)
    assert torch.equal(clip_grad_norm_([], 1.0, p), torch.nn.utils.clip_grad_norm_([], 1.0, p))
    if p not in (INF, -INF):
        empty = torch.zeros(0, requires_grad=True)
        empty.grad = torch.zeros(0)
        assert torch.equal(clip_grad_norm_([empty], 1.0, p), torch.nn.utils.clip_grad_norm_([empty], 1.0, p))


def clone_params(params):
    copies = []
    for p in params:
        c = p.detach().clone().requires_grad_()
        c.grad = None if p.grad is None else p.grad.clone()
        copies.append(c)
    return copies


def assert_grads_equal(a, b):
    for x, y in zip(a, b):
        assert (x.grad is None) == (y.grad is None)
        if x.grad is not None:
            assert x.grad.dtype == y.grad.dtype
            assert torch.equal(x.grad.isnan(), y.grad.isnan())
            assert torch.equal(x.grad.nan_to_num(), y.grad.nan_to_num()), f"differ in {int((x.grad != y.grad).sum())}"


@pytest.mark.parametrize("p", (INF, 1.0), ids=str)
def test_clip_grads_bit_for_bit_when_the_norm_is_exact(p):
    """Dyadic grads (k/16) make max and the 1-norm exact in both, hence the same coefficient; the
    grads are then scaled by torch's own _foreach_mul_: equal to torch's bit for bit. None grads stay."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.zeros(n, requires_grad=True) for n in (1, 7, 4097, 5, 300)]
    for i, param in enumerate(params):
        if i != 3:
            param.grad = torch.randint(-64, 65, param.shape, generator=gen).float() / 16
    ref = clone_params(params)
    ours = clip_grad_norm_(params, 0.75, p)
    theirs = torch.nn.utils.clip_grad_norm_(ref, 0.75, p)
    assert torch.equal(ours, theirs)
    assert float(ours) > 0.75  # the coefficient is < 1: grads were really scaled
    assert_grads_equal(params, ref)
    assert params[3].grad is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_clamped_coefficient_still_multiplies(dtype):
    """A norm below max_norm clamps the coefficient to 1, and the grads are still multiplied
    in place (torch avoids a host sync that way): same values, and the version counter moves."""
    params = [torch.zeros(n, dtype=dtype, requires_grad=True) for n in (3, 4097)]
    for param, grad in zip(params, make([(3,), (4097,)], dtype, scale=1e-3)):
        param.grad = grad
    ref = clone_params(params)
    before = [p.grad._version for p in params]
    ref_before = [p.grad._version for p in ref]
    ours = clip_grad_norm_(params, 10.0)
    theirs = torch.nn.utils.clip_grad_norm_(ref, 10.0)
    assert ours.dtype == theirs.dtype
    assert [p.grad._version - b for p, b in zip(params, before)] == [p.grad._version - b for p, b in zip(ref, ref_before)]
    assert all(p.grad._version > b for p, b in zip(params, before))
    assert_grads_equal(params, ref)


def test_the_1e6_in_the_coefficient():
    """A norm of exactly max_norm = 2^-20 (~9.5e-7) still clips: max_norm / (norm + 1e-6) ~ 0.49."""
    param = torch.zeros(1, requires_grad=True)
    param.grad = torch.tensor([2.0**-20])
    ref = clone_params([param])
    ours = clip_grad_norm_([param], 2.0**-20)
    theirs = torch.nn.utils.clip_grad_norm_(ref, 2.0**-20)
    assert float(ours) == float(theirs) == 2.0**-20
    assert 0.45 * 2.0**-20 < float(param.grad) < 0.5 * 2.0**-20
    assert_grads_equal([param], ref)


# Where the non-finite values go: which grad, which element, which value.
NONFINITE = {
    "inf": [(1, 3, INF)],
    "-inf": [(0, 2, -INF)],
    "nan": [(1, 0, math.nan)],
    "inf_and_nan": [(0, 1, INF), (2, 5, math.nan)],
    "inf_and_-inf": [(0, 1, INF), (2, 4000, -INF)],
}


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64), ids=str)
@pytest.mark.parametrize("p", NORM_TYPES, ids=str)
@pytest.mark.parametrize("case", NONFINITE)
def test_nonfinite_grads_match_torch(case, p, dtype):
    grads = make([(5,), (7,), (4097,)], dtype)
    for i, j, v in NONFINITE[case]:
        grads[i][j] = v
    ours, theirs = get_total_norm(grads, p), torch.nn.utils.get_total_norm(grads, p)
    assert ours.dtype == theirs.dtype
    assert bool(ours.isnan()) == bool(theirs.isnan())
    assert float(ours) == float(theirs) or (ours.isnan() and theirs.isnan()) or math.isclose(
        float(ours), float(theirs), rel_tol=TOLERANCES[dtype][1])
    # clip_grad_norm_ scales by the non-finite norm anyway (coefficient 0 or NaN), as torch does.
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for param, g in zip(params, grads):
        param.grad = g.clone()
    ref = clone_params(params)
    ours = clip_grad_norm_(params, 1.0, p)
    theirs = torch.nn.utils.clip_grad_norm_(ref, 1.0, p)
    if torch.equal(ours, theirs) or (ours.isnan() and theirs.isnan()):
        assert_grads_equal(params, ref)  # the same coefficient (0 or NaN where the norm is not finite)


@pytest.mark.parametrize("p", NORM_TYPES, ids=str)
@pytest.mark.parametrize("case", NONFINITE)
def test_error_if_nonfinite_raises_torchs_message(case, p):
    grads = make([(5,), (7,), (4097,)], torch.float32)
    for i, j, v in NONFINITE[case]:
        grads[i][j] = v
    params = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for param, g in zip(params, grads):
        param.grad = g.clone()
    ref = clone_params(params)
    if math.isfinite(float(torch.nn.utils.get_total_norm(grads, p))):  # p = 0, and -inf skips the inf
        clip_grad_norm_(params, 1.0, p, error_if_nonfinite=True)
        torch.nn.utils.clip_grad_norm_(ref, 1.0, p, error_if_nonfinite=True)
        assert_grads_equal(params, ref)
        return
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_(ref, 1.0, p, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as ours:
        clip_grad_norm_(params, 1.0, p, error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)
    assert "non-finite" in str(ours.value)
    with pytest.raises(RuntimeError) as direct:
        get_total_norm(grads, p, error_if_nonfinite=True)
    assert str(direct.value) == str(theirs.value)
    for param, g in zip(params, grads):  # nothing was scaled
        assert torch.equal(param.grad.nan_to_num(), g.nan_to_num())


def test_generator_of_params():
    params = [torch.zeros(n, requires_grad=True) for n in (3, 4097)]
    for param, g in zip(params, make([(3,), (4097,)], torch.float32, scale=3.0)):
        param.grad = g
    ref = clone_params(params)
    ours = clip_grad_norm_((p for p in params), 1.0)
    theirs = torch.nn.utils.clip_grad_norm_((p for p in ref), 1.0)
    assert_close_rel(ours, theirs, TOLERANCES[torch.float32][1], "generator")
    assert float(ours) > 1.0
    torch.testing.assert_close([p.grad for p in params], [p.grad for p in ref], rtol=5e-4, atol=0)


def test_empty_generator_warns_as_torch_does():
    with pytest.warns(UserWarning) as theirs:
        torch.nn.utils.clip_grad_norm_((p for p in []), 1.0)
    with pytest.warns(UserWarning) as ours:
        result = clip_grad_norm_((p for p in []), 1.0)
    assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    assert torch.equal(result, torch.tensor(0.0))
    with warnings.catch_warnings():  # an empty list is not a generator: no warning
        warnings.simplefilter("error")
        clip_grad_norm_([], 1.0)


@pytest.mark.parametrize("dtypes,expected", [
    ((torch.float16, torch.float32), torch.float32),
    ((torch.bfloat16, torch.float16), torch.float32),
    ((torch.float64, torch.bfloat16), torch.float64),
    ((torch.bfloat16, torch.bfloat16), torch.bfloat16),
])
@pytest.mark.parametrize("p", (INF, 2.0, 0.5, 0.0), ids=str)
def test_mixed_dtypes_return_torchs_dtype(dtypes, expected, p):
    tensors = [make([(n,)], dtype, seed=i)[0] for i, (n, dtype) in enumerate(zip((7, 4097), dtypes))]
    ours, theirs = get_total_norm(tensors, p), torch.nn.utils.get_total_norm(tensors, p)
    assert ours.dtype == theirs.dtype == expected
    if p in (INF, 0.0):  # exact in both
        assert torch.equal(ours, theirs)
        return
    # pyfused rounds the double total once to the result's dtype (fp32 lanes for all but fp64
    # grads, so fp64 + bf16 is as close as fp32: 2e-6); torch first rounds each tensor's norm to
    # its own dtype.
    rtol = max(TOLERANCES[expected][0], max(TOLERANCES[torch.float32][0] for d in dtypes if d != torch.float64))
    assert_close_rel(ours, reference(tensors, p), rtol, "pyfused")
    if any(math.isinf(float(torch.linalg.vector_norm(t, p))) for t in tensors):
        # (bf16 + fp16, p = 0.5): torch rounds the fp16 tensor's own norm (~4e6) to fp16: inf. pyfused sums the
        # powers in double and rounds the total once, to fp32: finite. A known, better difference.
        assert math.isinf(float(theirs))
        return
    assert_close_rel(theirs, reference(tensors, p), max(TOLERANCES[d][1] for d in dtypes), "torch")


def test_strided_grads():
    """A transposed and a sliced grad are read in their logical order."""
    base = make([(64, 33)], torch.float32)[0]
    tensors = [base.t(), base[:, ::2], base[5]]
    for p in NORM_TYPES:
        ours, theirs = get_total_norm(tensors, p), torch.nn.utils.get_total_norm(tensors, p)
        if p in (INF, -INF, 0.0):
            assert torch.equal(ours, theirs)
        else:
            assert_close_rel(ours, reference(tensors, p), TOLERANCES[torch.float32][0], str(p))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_independent_of_thread_count(dtype):
    tensors = make([(16385 * 3,), (7,), (40000,)] + [(n % 23,) for n in range(100)], dtype)
    old = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results[threads] = [get_total_norm(tensors, p) for p in NORM_TYPES if p not in (INF, -INF)]
            results[threads] += [get_total_norm([t for t in tensors if t.numel()], p) for p in (INF, -INF)]
    finally:
        torch.set_num_threads(old)
    for a, b in zip(results[1], results[2]):
        assert a.dtype == b.dtype and torch.equal(a, b), (a, b)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("name", FUSED)
def test_fused_clip_matches_clip_then_step(name, dtype):
    kwargs = FUSED[name]
    params, groups, grads = training(name, kwargs, dtype)
    ref_params, ref_groups, _ = training(name, kwargs, dtype)
    opt = getattr(pyfused.optim, name)(groups, **kwargs)
    ref = getattr(pyfused.optim, name)(ref_groups, **kwargs)
    torch_params, torch_groups, _ = training(name, kwargs, dtype)
    torch_ref = getattr(pyfused.optim, name)(torch_groups, **kwargs)
    clipped = 0
    for step_grads in grads:
        for ps in (params, ref_params, torch_params):
            for p, g in zip(ps, step_grads):
                p.grad = None if g is None else g.clone()
        norm = clip_grad_norm_(params, 20.0, optimizer=opt)
        ref_norm = clip_grad_norm_(ref_params, 20.0)  # scales the grads with torch's _foreach_mul_
        torch_norm = torch.nn.utils.clip_grad_norm_(torch_params, 20.0)
        assert torch.equal(norm, ref_norm)
        clipped += float(norm) > 20.0
        opt.step()
        ref.step()
        torch_ref.step()
        for p, g in zip(params, step_grads):  # the fused path leaves p.grad unclipped
            assert (p.grad is None) if g is None else torch.equal(p.grad, g)
        assert_close_rel(norm, torch_norm, TOLERANCES[dtype][1], "norm vs torch")
    assert 0 < clipped < len(grads)
    for a, b in zip(params, ref_params):
        assert torch.equal(a, b), f"{int((a != b).sum())} elements differ"
    for a, b in zip(params, ref_params):
        sa, sb = opt.state[a], ref.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    # Against torch's own clip_grad_norm_ (its norm differs in the last bits, so the coefficient
    # does): a relative 5e-4 in fp32, 1e-12 in fp64, on every param.
    rtol = TOLERANCES[dtype][1]
    torch.testing.assert_close(params, torch_params, rtol=rtol, atol=rtol)


def test_fused_clip_multiplier_is_used_once():
    """The deferred coefficient applies to the next step only; the step after is unclipped."""
    params, groups, grads = training("Adam", FUSED["Adam"])
    ref_params, ref_groups, _ = training("Adam", FUSED["Adam"])
    opt, ref = pyfused.optim.Adam(groups, lr=1e-2), pyfused.optim.Adam(ref_groups, lr=1e-2)
    for k, step_grads in enumerate(grads[:4]):
        for ps in (params, ref_params):
            for p, g in zip(ps, step_grads):
                p.grad = None if g is None else g.clone() * 40
        if k % 2 == 0:
            norm = clip_grad_norm_(params, 1.0, optimizer=opt)
            clip_grad_norm_(ref_params, 1.0)
            assert float(norm) > 1.0
        opt.step()
        ref.step()
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params))


def test_fused_clip_with_clip_grads_with_norm_and_given_norm():
    params, groups, grads = training("SGD", FUSED["SGD"])
    ref_params, ref_groups, _ = training("SGD", FUSED["SGD"])
    opt, ref = pyfused.optim.SGD(groups, **FUSED["SGD"]), pyfused.optim.SGD(ref_groups, **FUSED["SGD"])
    for step_grads in grads[:3]:
        for ps in (params, ref_params):
            for p, g in zip(ps, step_grads):
                p.grad = None if g is None else g.clone()
        clip_grads_with_norm_(params, 1.0, torch.tensor(37.5), optimizer=opt)
        torch.nn.utils.clip_grads_with_norm_(ref_params, 1.0, torch.tensor(37.5))
        opt.step()
        ref.step()
    assert all(torch.equal(a, b) for a, b in zip(params, ref_params))


def test_fused_clip_rejects_other_parameter_sets():
    params = [torch.zeros(n, requires_grad=True) for n in (3, 5, 7)]
    outsider = torch.zeros(2, requires_grad=True)
    for p in params + [outsider]:
        p.grad = torch.ones_like(p)
    opt = pyfused.optim.Adam(params, lr=0.1)
    message = ("clip_grads_with_norm_(optimizer=...) scales every grad the optimizer steps, so "
               "`parameters` must be exactly the optimizer's params that have grads")
    for wrong in (params[:2], params + [outsider], [outsider]):
        with pytest.raises(ValueError) as error:
            clip_grad_norm_(wrong, 1e-3, optimizer=opt)
        assert str(error.value) == message
    # Nothing was deferred by the failed calls: the step equals a plain step.
    ref = [p.detach().clone().requires_grad_() for p in params]
    for r in ref:
        r.grad = torch.ones_like(r)
    opt.step()
    pyfused.optim.Adam(ref, lr=0.1).step()
    assert all(torch.equal(a, b) for a, b in zip(params, ref))
    # Params without grads are left out on both sides; a generator is fine.
    params[2].grad = None
    clip_grad_norm_((p for p in params), 1e-3, optimizer=opt)


def test_fused_clip_rejects_a_torch_optimizer():
    p = torch.zeros(3, requires_grad=True)
    p.grad = torch.ones(3)
    for opt in (torch.optim.Adam([p]), torch.optim.SGD([p], lr=0.1)):
        with pytest.raises(TypeError) as error:
            clip_grad_norm_([p], 1.0, optimizer=opt)
        assert str(error.value) == f"optimizer= takes a pyfused optimizer, not {type(opt).__name__}"
    assert torch.equal(p.grad, torch.ones(3))


def test_norm_under_the_torch_backend():
    grads = make([(7,), (4097,)], torch.float32)
    with pyfused.use_backend("torch"):
        ours = get_total_norm(grads)
    assert_close_rel(ours, reference(grads, 2.0), TOLERANCES[torch.float32][1], "torch backend")


def test_fused_clip_leaves_grads_unclipped_under_the_torch_backend():
    p = torch.ones(4, requires_grad=True)
    p.grad = torch.full((4,), 2.0)
    opt = pyfused.optim.SGD([p], lr=0.1)
    norm = get_total_norm([p.grad])  # computed outside: see test_norm_under_the_torch_backend
    with pyfused.use_backend("torch"):
        clip_grads_with_norm_([p], 0.5, norm, optimizer=opt)
        opt.step()
    assert torch.allclose(p.detach(), torch.full((4,), 0.975))  # the step itself is clipped
    assert torch.equal(p.grad, torch.full((4,), 2.0))


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("n", (15, 16, 513, 16384 + 600, 65536 + 7))
def test_16bit_norm_sums_as_its_float_copy(dtype, n):
    """16-bit grads are widened a block at a time before the lanes (csrc/norm.h); the powered sum
    must equal the fp32 copy's bit for bit (same values, lanes and order), whatever the block edges."""
    from pyfused import _cpp
    import array

    x = make([(n,)], dtype, seed=n)[0]
    wide = x.float()

    def powered(t, kind):
        return _cpp.norm_powered_sum(_cpp.DTYPE_CODES[t.dtype], array.array("q", [t.numel()]),
                                     array.array("q", [t.data_ptr()]), kind, 3.0)

    for kind in range(5):
        assert powered(x, kind) == powered(wide, kind), kind


# flat=True arenas: handed all of an arena's grads, clip_grad_norm_ reads and scales its grad
# buffers, one kernel entry per buffer. The norm is then summed over other chunk boundaries than
# the per-tensor path's, so it is compared against the float64 reference at pyfused's tolerance
# (max and min: bit for bit with torch); the grads against torch's scaling by that norm, bit for
# bit (the same multiply per element).
ARENA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ARENA_SIZES = (1, 7, 4097, 130, 16385, 3)


def arena_optimizer(dtypes, sizes=ARENA_SIZES, seed=0, scale=1.0):
    """Params of `dtypes` dealt round-robin into two groups of a flat=True SGD (a buffer per
    dtype, a segment per group), a third group added later (more buffers); grads set in place."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(n, dtype=dtypes[i % len(dtypes)])) for i, n in enumerate(sizes * 2)]
    optimizer = pyfused.optim.SGD([{"params": params[0::3]}, {"params": params[1::3], "lr": 0.5}], lr=0.1, flat=True)
    optimizer.add_param_group({"params": params[2::3]})
    for p in params:
        p.grad.copy_((torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale).to(p.dtype))
    return params, optimizer


def kernel_entries(monkeypatch):
    """The entries (spans or tensors) each norm kernel call is handed, call by call."""
    calls = []
    original = pyfused._cpp.norm_powered_sum

    def counting(dtype_code, numels, *args):
        calls.append(len(numels))
        return original(dtype_code, numels, *args)

    monkeypatch.setattr(pyfused._cpp, "norm_powered_sum", counting)
    return calls


def assert_clipped_like_torch(params, ref, ours, max_norm, p, foreach):
    """ours (the norm) against torch's (max, min, count) or the float64 reference, and the grads
    against torch's scaling by ours."""
    grads = [q.grad for q in ref if q.grad is not None]
    theirs = torch.nn.utils.get_total_norm(grads, p)
    assert ours.dtype == theirs.dtype
    expected = reference(grads, p)
    if p in (INF, -INF, 0.0):
        assert torch.equal(ours, theirs) or (ours.isnan() and theirs.isnan()), (ours, theirs)
    elif not math.isfinite(float(expected)):  # an inf or a nan among the grads
        assert float(ours) == float(expected) or (ours.isnan() and expected.isnan()), (ours, expected)
    else:  # (torch may round a 16-bit tensor's own norm to inf here: see test_mixed_dtypes_return_torchs_dtype)
        dtypes = {g.dtype for g in grads}
        # fp32 lanes for all but fp64 grads, rounded once to the result's dtype
        rtol = max([TOLERANCES[ours.dtype][0]] + [TOLERANCES[torch.float32][0] for d in dtypes if d != torch.float64])
        assert_close_rel(ours, expected, rtol, "pyfused")
    torch.nn.utils.clip_grads_with_norm_(ref, max_norm, ours, foreach=foreach)
    assert_grads_equal(params, ref)


@pytest.mark.parametrize("foreach", (True, False), ids=lambda f: f"foreach={f}")
@pytest.mark.parametrize("p", NORM_TYPES, ids=str)
@pytest.mark.parametrize("dtypes", [(torch.float32,), ARENA_DTYPES], ids=["fp32", "mixed"])
def test_arena_clip_one_span_per_buffer(dtypes, p, foreach, monkeypatch):
    params, optimizer = arena_optimizer(dtypes)
    buffers = optimizer._pyfused_arena.grad_buffers
    assert len(buffers) == 2 * len(dtypes)  # construction, then add_param_group
    ref = clone_params(params)
    calls = kernel_entries(monkeypatch)
    ours = clip_grad_norm_(params, 0.5, p, foreach=foreach)
    if p == 0.0:  # torch's count of nonzero tensors: per tensor, by torch's own norms
        assert calls == []
    else:
        assert sum(calls) == len(buffers) and len(calls) == len(dtypes)  # one call per dtype, a span per buffer
    assert float(ours) > 0.5 or p == -INF  # the grads were really scaled
    assert_clipped_like_torch(params, ref, ours, 0.5, p, foreach)
    assert all(any(q.grad._base is b for b in buffers) for q in params)  # scaled in place: still the views


def test_arena_clip_in_any_order_and_then_a_step(monkeypatch):
    """The model's order, not the optimizer's: still the buffers. A step after it takes the
    clipped grads from the arena."""
    params, optimizer = arena_optimizer((torch.float32,))
    ref = clone_params(params)
    calls = kernel_entries(monkeypatch)
    ours = clip_grad_norm_(params[::-1], 0.5)
    assert calls == [len(optimizer._pyfused_arena.grad_buffers)]
    assert_clipped_like_torch(params, ref, ours, 0.5, 2.0, None)
    torch_optimizer = torch.optim.SGD([{"params": ref[0::3]}, {"params": ref[1::3], "lr": 0.5}], lr=0.1)
    torch_optimizer.add_param_group({"params": ref[2::3]})
    optimizer.step()
    torch_optimizer.step()
    for q, r in zip(params, ref):
        torch.testing.assert_close(q.detach(), r.detach())  # fp32: at torch's fp32 tolerance (its FMA-free update)


@pytest.mark.parametrize("p", NORM_TYPES, ids=str)
def test_arena_clip_error_if_nonfinite(p, monkeypatch):
    """A non-finite grad in the arena: torch's message (nothing scaled) or torch's scaling."""
    params, optimizer = arena_optimizer((torch.float32, torch.bfloat16))
    params[4].grad[3] = INF
    params[5].grad[0] = math.nan
    ref = clone_params(params)
    theirs = torch.nn.utils.get_total_norm([q.grad for q in ref], p)
    calls = kernel_entries(monkeypatch)
    if math.isfinite(float(theirs)):  # p = 0 counts tensors
        ours = clip_grad_norm_(params, 1.0, p, error_if_nonfinite=True)
        assert_clipped_like_torch(params, ref, ours, 1.0, p, None)
        return
    with pytest.raises(RuntimeError) as expected:
        torch.nn.utils.clip_grad_norm_(clone_params(ref), 1.0, p, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as raised:
        clip_grad_norm_(params, 1.0, p, error_if_nonfinite=True)
    assert str(raised.value) == str(expected.value)
    assert_grads_equal(params, ref)  # nothing scaled
    assert sum(calls) == len(optimizer._pyfused_arena.grad_buffers)
    ours = clip_grad_norm_(params, 1.0, p)  # scaled by the non-finite norm anyway, as torch does
    assert_clipped_like_torch(params, ref, ours, 1.0, p, None)


def _subset(params, optimizer):
    return params[1:], len(params) - 1


def _replaced(params, optimizer):
    params[2].grad = params[2].grad.clone()
    return params, len(params)


def _data_replaced(params, optimizer):
    params[2].grad.data = params[2].grad.data.clone()
    return params, len(params)


def _none(params, optimizer):
    params[2].grad = None
    return params, len(params) - 1


def _duplicate(params, optimizer):
    return params[:-1] + params[:1], len(params)


def _other_arena(params, optimizer):
    more = [torch.nn.Parameter(torch.zeros(5))]
    pyfused.optim.SGD(more, lr=0.1, flat=True)
    more[0].grad.normal_()
    return params + more, len(params) + 1


FALLBACKS = {"subset": _subset, "grad_replaced": _replaced, "grad_data_replaced": _data_replaced,
             "grad_none": _none, "duplicate": _duplicate, "with_another_arena": _other_arena}


@pytest.mark.parametrize("p", (INF, 2.0, 0.5), ids=str)
@pytest.mark.parametrize("case", FALLBACKS)
def test_arena_clip_falls_back_per_tensor(case, p, monkeypatch):
    """Anything but exactly the arena's grad views: one entry per tensor, torch's results."""
    params, optimizer = arena_optimizer((torch.float32,))
    given, n = FALLBACKS[case](params, optimizer)
    copies = {}  # a duplicate stays one tensor, counted and scaled twice (torch's own behaviour)
    ref = [copies.setdefault(id(q), clone_params([q])[0]) for q in given]
    calls = kernel_entries(monkeypatch)
    ours = clip_grad_norm_(given, 0.5, p)
    assert calls == [n]
    assert_clipped_like_torch(given, ref, ours, 0.5, p, None)


@pytest.mark.parametrize("p", NORM_TYPES, ids=str)
def test_arena_clip_with_an_empty_grad(p, monkeypatch):
    """An empty param in the arena: max and min raise torch's message (per-tensor path); the others
    still take the buffers."""
    params, optimizer = arena_optimizer((torch.float32,), sizes=(3, 0, 4097))
    ref = clone_params(params)
    calls = kernel_entries(monkeypatch)
    if p in (INF, -INF):
        with pytest.raises(RuntimeError) as expected:
            torch.nn.utils.clip_grad_norm_(ref, 0.5, p)
        with pytest.raises(RuntimeError) as raised:
            clip_grad_norm_(params, 0.5, p)
        assert str(raised.value) == str(expected.value)
        return
    ours = clip_grad_norm_(params, 0.5, p)
    assert sum(calls) == (0 if p == 0.0 else len(optimizer._pyfused_arena.grad_buffers))
    assert_clipped_like_torch(params, ref, ours, 0.5, p, None)
