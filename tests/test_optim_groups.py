"""Param groups batched together: one C++ call per (dtype, state layout) whatever the group count,
each group's hyperparameters its own; and the step's cached plan picking up what changed.

Two references: torch's for-loop (fp32, at torch's own fp32 tolerance, oc.DTYPES: pyfused's sqrt
is correctly rounded, torch's CPU sqrt is not), and pyfused itself with one optimizer per group,
which must agree bit for bit in every dtype (one call over many groups computes what a call per
group computes)."""

import pytest
import torch
from torch.optim import lr_scheduler

import pyfused
from pyfused import _cpp
from pyfused.check import optim_cases as oc
from pyfused.check.optim_cases import DTYPES_BY_NAME, OPTIMIZERS

FP32 = DTYPES_BY_NAME["fp32"]

# Groups that differ only in scalar hyperparameters (never in the state layout), realistic values
# (lr 1e-3, weight decay 0.1 / 0.01 / none): each optimizer's first group is its constructor's.
SCALAR_GROUPS = {
    "SGD": ({"lr": 1e-3, "momentum": 0.9}, [
        {}, {"lr": 3e-3, "weight_decay": 0.1}, {"momentum": 0.5, "dampening": 0.1, "maximize": True},
        {"nesterov": True, "weight_decay": 0.01}, {"lr": 2e-4, "momentum": 0.99}]),
    "Adagrad": ({"lr": 1e-2}, [
        {}, {"lr": 3e-3, "weight_decay": 0.1}, {"lr_decay": 0.01, "maximize": True}, {"eps": 1e-6}]),
    "RMSprop": ({"lr": 1e-3}, [
        {}, {"lr": 3e-3, "weight_decay": 0.1}, {"alpha": 0.9, "maximize": True}, {"eps": 1e-6, "weight_decay": 0.01}]),
    "Adam": ({"lr": 1e-3}, [
        {}, {"lr": 3e-3, "weight_decay": 0.1}, {"betas": (0.8, 0.99), "maximize": True},
        {"eps": 1e-6, "weight_decay": 0.01}, {"betas": (0.3, 0.9)}]),  # beta1 < 0.5: lerp's other formula
    "AdamW": ({"lr": 1e-3}, [
        {}, {"lr": 3e-3, "weight_decay": 0.1}, {"weight_decay": 0.0}, {"betas": (0.8, 0.99), "maximize": True}]),
    "Adadelta": ({"lr": 1.0}, [
        {}, {"lr": 0.5, "weight_decay": 0.1}, {"rho": 0.95, "maximize": True}, {"eps": 1e-5}]),
}
# The options that change the state layout, hence the call: a second value for each.
LAYOUT_OPTIONS = {"SGD": {"momentum": 0.0}, "Adagrad": None, "RMSprop": {"centered": True},
                  "Adam": {"amsgrad": True}, "AdamW": {"amsgrad": True}, "Adadelta": None}
SIZES = (0, 1, 7, 4097, 130)


def make_params(n_groups, dtypes=(torch.float32,), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.nn.Parameter(torch.randn(n, generator=g).to(dtypes[(i + k) % len(dtypes)]))
             for k, n in enumerate(SIZES)] for i in range(n_groups)]


def clone(param_lists):
    return [[torch.nn.Parameter(p.detach().clone()) for p in ps] for ps in param_lists]


def set_grads(param_lists, step):
    g = torch.Generator().manual_seed(1000 + step)
    for ps in param_lists:
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


@pytest.fixture
def calls(monkeypatch):
    """(dtype code, tensors) of each call into the C++ entry point."""
    seen, real = [], _cpp.optimizer_step

    def counting(kernel, bucket, hypers, factor, stats=None, average=None):
        seen.append((bucket.dtype_code, bucket.n))
        return real(kernel, bucket, hypers, factor, stats, average)

    monkeypatch.setattr(_cpp, "optimizer_step", counting)
    return seen


def run(cls, param_lists, kwargs, options, steps, calls=None, per_step=None, extra=None):
    opt = cls([{"params": ps, **oc._fresh(o)} for ps, o in zip(param_lists, options)], **oc._fresh(kwargs), **(extra or {}))
    for step in range(steps):
        set_grads(param_lists, step)
        if calls is not None:
            calls.clear()
        opt.step()
        if per_step is not None:
            per_step(calls)
    return opt


def assert_states(opt_a, lists_a, opt_b, lists_b, bitwise):
    for i, (p, q) in enumerate(zip(sum(lists_a, []), sum(lists_b, []))):
        pairs = [("param", p, q)] + [(k, opt_a.state[p][k], v) for k, v in opt_b.state.get(q, {}).items()
                                     if isinstance(v, torch.Tensor)]
        assert set(opt_a.state.get(p, {})) == set(opt_b.state.get(q, {})), f"param {i}: state keys differ"
        for key, a, b in pairs:
            if bitwise:
                assert a.dtype == b.dtype and torch.equal(a.detach().view(-1).view(torch.uint8),
                                                          b.detach().contiguous().view(-1).view(torch.uint8)), \
                    f"param {i} {key}: differs bitwise"
            else:
                oc._assert_close(a.detach(), b.detach(), FP32, f"param {i} {key}")


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_groups_differing_in_scalars_make_one_call_and_match_torch(name, calls):
    kwargs, options = SCALAR_GROUPS[name]
    ours_params = make_params(len(options))
    theirs_params = clone(ours_params)

    def one_call(seen):
        assert seen == [(0, len(options) * len(SIZES))], seen

    ours = run(OPTIMIZERS[name][1], ours_params, kwargs, options, 20, calls, one_call)
    theirs = run(OPTIMIZERS[name][0], theirs_params, kwargs, options, 20, extra={"foreach": False})
    assert_states(ours, ours_params, theirs, theirs_params, bitwise=False)
    moved = [not torch.equal(p, q) for p, q in zip(sum(ours_params, []), sum(make_params(len(options)), []))]
    assert sum(moved) == len(moved) - len(options), "every param but the empty ones must move"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_mixed_layouts_and_dtypes_match_one_optimizer_per_group_bitwise(name, calls):
    """Groups with and without a layout option, params of four dtypes: one call per (dtype,
    layout), and exactly the bits of a pyfused optimizer per group."""
    kwargs, options = SCALAR_GROUPS[name]
    layout = LAYOUT_OPTIONS[name]
    options = [{**o, **(layout if i % 2 and layout else {})} for i, o in enumerate(options)]
    if name == "SGD":  # Nesterov needs momentum
        options = [{k: v for k, v in o.items() if k != "nesterov"} if o.get("momentum") == 0.0 else o for o in options]
    dtypes = (torch.float32, torch.bfloat16, torch.float64, torch.float16)
    ours_params = make_params(len(options), dtypes)
    layouts = 2 if layout else 1

    def counted(seen):
        assert len(seen) == layouts * len(dtypes), seen
        assert sum(n for _, n in seen) == len(options) * len(SIZES)

    ours = run(OPTIMIZERS[name][1], ours_params, kwargs, options, 12, calls, counted)
    for i, o in enumerate(options):
        alone_params = make_params(len(options), dtypes)[i:i + 1]
        alone = run(OPTIMIZERS[name][1], alone_params, kwargs, [o], 0)
        for step in range(12):  # the same grads as group i had in the batched run
            lists = make_params(len(options), dtypes)
            set_grads(lists, step)
            for p, q in zip(alone_params[0], lists[i]):
                p.grad = q.grad
            alone.step()
        assert_states(ours, ours_params[i:i + 1], alone, alone_params, bitwise=True)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_per_group_schedulers_take_effect_next_step(name, calls):
    """LambdaLR with a lambda per group: one call per step, lr trajectories and params as torch's."""
    kwargs, options = SCALAR_GROUPS[name]
    lambdas = [lambda s, k=k: 0.9 ** (s * (k + 1)) for k in range(len(options))]

    def scheduled(cls, param_lists, count):
        opt = cls([{"params": ps, **oc._fresh(o)} for ps, o in zip(param_lists, options)], **oc._fresh(kwargs),
                  **({} if count else {"foreach": False}))
        sched = lr_scheduler.LambdaLR(opt, lambdas)
        lrs = []
        for step in range(15):
            set_grads(param_lists, step)
            calls.clear()
            opt.step()
            if count:
                assert len(calls) == 1, calls
            sched.step()
            lrs.append([g["lr"] for g in opt.param_groups])
        return opt, lrs

    ours_params = make_params(len(options))
    theirs_params = clone(ours_params)
    ours, ours_lrs = scheduled(OPTIMIZERS[name][1], ours_params, True)
    theirs, theirs_lrs = scheduled(OPTIMIZERS[name][0], theirs_params, False)
    assert ours_lrs == theirs_lrs and len({tuple(lr) for lr in ours_lrs}) > 1
    assert_states(ours, ours_params, theirs, theirs_params, bitwise=False)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_add_param_group_after_steps_joins_the_call(name, calls):
    kwargs, options = SCALAR_GROUPS[name]
    ours_params, later = make_params(len(options)), make_params(1, seed=5)
    theirs_params, theirs_later = clone(ours_params), clone(later)
    optimizers = []
    for cls, lists, extra_list, extra in ((OPTIMIZERS[name][1], ours_params, later, {}),
                                          (OPTIMIZERS[name][0], theirs_params, theirs_later, {"foreach": False})):
        opt = run(cls, lists[:-1], kwargs, options[:-1], 5, extra=extra)
        opt.add_param_group({"params": lists[-1], **oc._fresh(options[-1])})
        opt.add_param_group({"params": extra_list[0], "lr": 1e-3})
        for step in range(5, 12):
            set_grads(lists + extra_list, step)
            calls.clear()
            opt.step()
            if cls is OPTIMIZERS[name][1]:
                assert len(calls) == 1, calls
        optimizers.append(opt)
    assert_states(optimizers[0], ours_params + later, optimizers[1], theirs_params + theirs_later, bitwise=False)


@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_what_changes_between_steps_is_picked_up(name, calls):
    """Grads that persist (the cached fast path), then a replaced grad, a grad given new storage
    (.data), a grad transposed in place, a replaced p.data and a param that loses its grad: each
    step as torch's."""
    kwargs, options = SCALAR_GROUPS[name]
    square = [[torch.nn.Parameter(torch.randn(6, 6, generator=torch.Generator().manual_seed(3)))]]
    ours_params = make_params(2) + square
    theirs_params = clone(ours_params)
    opts = [cls([{"params": ps, **oc._fresh(o)} for ps, o in zip(lists, options)], **oc._fresh(kwargs), **extra)
            for cls, lists, extra in ((OPTIMIZERS[name][1], ours_params, {}),
                                      (OPTIMIZERS[name][0], theirs_params, {"foreach": False}))]
    set_grads(ours_params, 0)
    for p, q in zip(sum(theirs_params, []), sum(ours_params, [])):
        p.grad = q.grad.clone()

    def change(step, lists):
        p = lists[0][2]
        g = torch.Generator().manual_seed(step)
        if step == 3:
            p.grad = torch.randn(p.shape, generator=g)
        if step == 4:
            p.grad.data = torch.randn(p.shape, generator=g)
        if step == 5:
            lists[2][0].grad.t_()
        if step == 6:
            with torch.no_grad():
                p.data = p.data.clone() * 0.5
        if step == 7:
            lists[1][3].grad = None

    for step in range(10):
        for lists, opt in zip((ours_params, theirs_params), opts):
            change(step, lists)
            opt.step()
        assert_states(opts[0], ours_params, opts[1], theirs_params, bitwise=False)
    assert len(calls) == 10  # one call per step throughout


@pytest.mark.parametrize("versions", [True, False], ids=["dict versions", "no versions"])
def test_group_options_changed_between_steps_take_effect(versions, monkeypatch):
    """A step reuses the last step's group scalars while no group dict changed (dict_version):
    options assigned, and an option that is a list changed in place (which no dict version sees: such groups are never cached) each take effect at the
    next step, as in torch."""
    from pyfused.optim import _fused

    if versions:
        assert _fused._dict_version is not None  # this torch and Python have them
    else:
        monkeypatch.setattr(_fused, "_dict_version", None)
    ours_params = make_params(3)
    theirs_params = clone(ours_params)
    opts = [cls([{"params": ps, "lr": 1e-3 * (i + 1)} for i, ps in enumerate(lists)], **extra)
            for cls, lists, extra in ((pyfused.optim.Adam, ours_params, {}),
                                      (torch.optim.Adam, theirs_params, {"foreach": False}))]
    for step in range(8):
        set_grads(ours_params, step)
        for p, q in zip(sum(theirs_params, []), sum(ours_params, [])):
            p.grad = q.grad.clone()
        for opt in opts:
            if step == 3:
                opt.param_groups[1]["lr"] = 0.05
            if step == 5:
                opt.param_groups[2]["maximize"] = True
            if step == 4:
                opt.param_groups[0]["betas"] = [0.9, 0.999]
            if step == 6:
                opt.param_groups[0]["betas"][0] = 0.5  # in place: the group dict does not change
            opt.step()
        assert_states(opts[0], ours_params, opts[1], theirs_params, bitwise=False)


@pytest.mark.parametrize("how", ["resize_", "view as int32"])
def test_a_grad_changed_in_place_after_a_step_is_checked_again(how):
    """The same grad object, at the same address with the same strides, but resized or re-viewed
    in place: the cached fast path must not take it, so the step refuses it and changes nothing."""
    p = torch.nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(0)))
    opt = pyfused.optim.Adam([p], lr=1e-3)
    p.grad = torch.randn(64, generator=torch.Generator().manual_seed(1))
    opt.step()
    if how == "resize_":
        p.grad.resize_(32)
    else:
        p.grad.data = p.grad.data.view(torch.int32)
    before = p.detach().clone()
    with pytest.raises(RuntimeError):
        opt.step()
    assert torch.equal(p.detach(), before)
