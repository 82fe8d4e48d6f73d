"""flat=True: params, grads and state in arenas (pyfused/optim/_arena.py).

Two references: torch's for-loop in fp32 (at torch's own fp32 tolerance, oc.DTYPES), and pyfused's
default path, which flat=True must match bit for bit in every dtype (the same kernels over the same
values, only laid out in spans). Grads reach the params through backward(), so autograd
accumulates into the arena's grad views, as in training."""

import copy

import pytest
import torch
from torch.optim import lr_scheduler

import pyfused
from pyfused.check import optim_cases as oc
from pyfused.check.optim_cases import OPTIMIZERS

NAMES = list(OPTIMIZERS)
SIZES = (0, 1, 7, 130, 4097)
KWARGS = {"SGD": {"lr": 1e-3, "momentum": 0.9, "weight_decay": 0.01}, "Adagrad": {"weight_decay": 0.1},
          "RMSprop": {"weight_decay": 0.01}, "Adam": {"weight_decay": 0.1}, "AdamW": {"weight_decay": 0.1},
          "Adadelta": {"weight_decay": 0.01}}


def make_params(dtypes, sizes=SIZES, seed=0):
    generator = torch.Generator().manual_seed(seed)
    params = []
    for i, n in enumerate(sizes):
        dtype = dtypes[i % len(dtypes)]
        shape = (n,) if n < 100 else (n // 10, 10) if n % 10 == 0 else (n,)
        params.append(torch.nn.Parameter(torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)))
    return params


def clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def grads_for(params, step):
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p.dtype) for p in params]


def backward(params, grads):
    """Accumulates grads into p.grad through autograd: sum(p * g) has gradient g."""
    sum((p * g).real.sum() if p.is_complex() else (p * g).sum() for p, g in zip(params, grads)).backward()


def groups_of(params, options):
    """Params dealt round-robin into len(options) groups."""
    return [dict(params=params[i :: len(options)], **o) for i, o in enumerate(options)]


def assert_same(flat_params, flat_opt, ref_params, ref_opt, tol=None):
    """Params and every state tensor: bitwise (tol None) or at tol's (rtol, atol)."""
    for i, (p, q) in enumerate(zip(flat_params, ref_params)):
        pairs = [("param", p.detach(), q.detach())]
        s, t = flat_opt.state.get(p, {}), ref_opt.state.get(q, {})
        assert set(s) == set(t), f"param {i}: state keys {sorted(s)} != {sorted(t)}"
        pairs += [(key, s[key], t[key]) for key in t]
        for what, a, b in pairs:
            if what == "step":
                assert a.item() == b.item() and a.dtype == b.dtype and a.shape == b.shape, f"param {i}: step {a} != {b}"
            elif tol is None:
                assert torch.equal(a, b), f"param {i}: {what} differs ({a.dtype})"
            else:
                torch.testing.assert_close(a, b, rtol=tol.rtol, atol=tol.atol, msg=lambda m: f"param {i} {what}: {m}")


def spans(optimizer):
    """The fast step's kernel tables (None when the next step takes the general path)."""
    return optimizer._pyfused_arena.spans


def train(params, optimizer, steps, first=0, zero=True):
    for step in range(first, first + steps):
        if zero:
            optimizer.zero_grad()
        backward(params, grads_for(params, step))
        optimizer.step()


@pytest.mark.parametrize("case", oc.CASES, ids=lambda c: c.id)
def test_matches_torch_forloop_and_the_default_path(case):
    """20 steps over three groups (the second flips a layout flag: amsgrad, centered, ...), fp32 at
    torch's fp32 tolerance against its for-loop, and bit for bit against pyfused's default path."""
    options = case.group_options()
    params = make_params([torch.float32])
    runs = {}
    for kind in ("flat", "default", "torch"):
        own = clone(params)
        if kind == "torch":
            optimizer = case.torch_cls(groups_of(own, options), **case.make_kwargs(), foreach=False)
        else:
            optimizer = case.pyfused_cls(groups_of(own, options), **case.make_kwargs(), flat=kind == "flat")
        train(own, optimizer, 20)
        runs[kind] = (own, optimizer)
    assert spans(runs["flat"][1]) is not None  # the later steps took the fast path
    assert_same(*runs["flat"], *runs["default"])
    assert_same(*runs["flat"], *runs["torch"], tol=oc.DTYPES_BY_NAME["fp32"])
    assert not all(torch.equal(p, q) for p, q in zip(runs["flat"][0], params))


@pytest.mark.parametrize("name", NAMES)
def test_mixed_dtypes_several_groups_bitwise(name):
    """fp32, fp64, bf16, fp16 and complex64 params spread over three groups: each (device, dtype)
    one buffer, each group a span of it; pyfused's default path is the reference in every dtype."""
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.complex64]
    params = make_params(dtypes, sizes=SIZES * 3)
    options = [{}, {"lr": 3e-3}, {"weight_decay": 0.0}]
    cls = OPTIMIZERS[name][1]
    flat, default = clone(params), clone(params)
    a = cls(groups_of(flat, options), **KWARGS[name], flat=True)
    b = cls(groups_of(default, options), **KWARGS[name])
    train(flat, a, 12)
    train(default, b, 12)
    assert spans(a) is not None
    kinds = {(s.dtype, s.n) for s in spans(a)}
    assert kinds == {(d, 3) for d in dtypes}  # one table per dtype, one span per group
    assert_same(flat, a, default, b)
    # the params (and grads) of a dtype share one storage: its buffer
    for d in dtypes:
        of_dtype = [p for p in flat if p.dtype == d]
        assert len({p.untyped_storage().data_ptr() for p in of_dtype}) == 1
        assert len({p.grad.untyped_storage().data_ptr() for p in of_dtype}) == 1


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_zeroes_the_arena_in_place(set_to_none):
    params = make_params([torch.float32])
    optimizer = pyfused.optim.AdamW(params, flat=True)
    views = [p.grad for p in params]
    assert all(g is not None and not g.any() for g in views)  # set to zeroed views at construction
    backward(params, grads_for(params, 0))
    optimizer.zero_grad(set_to_none=set_to_none)
    assert all(p.grad is v for p, v in zip(params, views))
    assert all(not v.any() for v in views)


def test_gradient_accumulation_over_several_backwards():
    params = make_params([torch.float32])
    flat, ref = clone(params), clone(params)
    a = pyfused.optim.Adam(flat, weight_decay=0.1, flat=True)
    b = torch.optim.Adam(ref, weight_decay=0.1, foreach=False)
    for step in range(6):
        a.zero_grad()
        b.zero_grad()
        for micro in range(3):
            backward(flat, grads_for(flat, 10 * step + micro))
            backward(ref, grads_for(ref, 10 * step + micro))
        a.step()
        b.step()
    assert spans(a) is not None
    assert_same(flat, a, ref, b, tol=oc.DTYPES_BY_NAME["fp32"])


@pytest.mark.parametrize("name", NAMES)
def test_grad_replaced_by_hand_and_param_without_grad(name):
    """A replaced p.grad is used (the general path), a param without a grad is skipped and its step
    lags (its run splits off); zero_grad() gives back the views, and the fast path resumes."""
    params = make_params([torch.float32])
    flat, ref = clone(params), clone(params)
    cls, torch_cls = OPTIMIZERS[name][1], OPTIMIZERS[name][0]
    a = cls(flat, **KWARGS[name], flat=True)
    b = torch_cls(ref, **KWARGS[name], foreach=False)
    for step in range(12):
        a.zero_grad()
        b.zero_grad()
        grads = grads_for(flat, step)
        if step == 4:  # grads assigned by hand
            for p, q, g in zip(flat, ref, grads):
                p.grad, q.grad = g.clone(), g.clone()
        elif step == 7:  # param 3 has no grad this step
            backward(flat, grads)
            backward(ref, grads)
            flat[3].grad = ref[3].grad = None
        else:
            backward(flat, grads)
            backward(ref, grads)
        a.step()
        b.step()
        if step in (4, 7):
            assert spans(a) is None
    assert spans(a) is not None
    assert_same(flat, a, ref, b, tol=oc.DTYPES_BY_NAME["fp32"])
    if name != "SGD":
        assert a.state[flat[3]]["step"].item() == 11 and a.state[flat[0]]["step"].item() == 12
        assert sum(s.n for s in spans(a)) > 1  # param 3's counter starts a run of its own


def test_param_data_replaced():
    """p.data replaced (loaded weights): that param lives outside the arena, every later step takes
    the general path, correctly."""
    params = make_params([torch.float32])
    flat, ref = clone(params), clone(params)
    a = pyfused.optim.AdamW(flat, flat=True)
    b = torch.optim.AdamW(ref, foreach=False)
    train(flat, a, 3)
    train(ref, b, 3)
    new = torch.randn(flat[4].shape)
    flat[4].data = new.clone()
    ref[4].data = new.clone()
    train(flat, a, 4, first=3)
    train(ref, b, 4, first=3)
    assert spans(a) is None
    assert flat[4].data_ptr() != a._pyfused_arena.param_addresses[4]
    assert_same(flat, a, ref, b, tol=oc.DTYPES_BY_NAME["fp32"])


@pytest.mark.parametrize("versions", [True, False], ids=["dict version", "values"])
def test_state_dict_of_a_param_replaced(versions, monkeypatch):
    """opt.state[p] = {...} (a reset of one param's state): the fast step's check (the version
    of optimizer.state where dict_version works, else the dicts by identity) sees it, and the
    new state moves into the arena."""
    from pyfused.optim import _fused

    if versions:
        assert _fused._dict_version is not None  # this torch and Python have it
    else:
        monkeypatch.setattr(_fused, "_dict_version", None)
    params = make_params([torch.float32])
    flat, ref = clone(params), clone(params)
    a = pyfused.optim.Adam(flat, flat=True)
    b = torch.optim.Adam(ref, foreach=False)
    train(flat, a, 3)
    train(ref, b, 3)
    for opt, p in ((a, flat[3]), (b, ref[3])):
        opt.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    train(flat, a, 3, first=3)
    train(ref, b, 3, first=3)
    assert spans(a) is not None  # back in the arena
    assert_same(flat, a, ref, b, tol=oc.DTYPES_BY_NAME["fp32"])


def test_grad_data_replaced_is_seen():
    """A grad view re-pointed in place (p.grad.data = t) keeps its identity, not its address."""
    params = make_params([torch.float32])
    a = pyfused.optim.SGD(params, lr=0.1, flat=True)
    train(params, a, 2)
    before = params[2].detach().clone()
    g = torch.ones_like(params[2])
    params[2].grad.data = g
    a.step()
    torch.testing.assert_close(params[2].detach(), before - 0.1 * g)


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group(name):
    params = make_params([torch.float32, torch.float64])
    extra = make_params([torch.float32], sizes=(5, 300), seed=1)
    flat, ref = clone(params), clone(params)
    flat_extra, ref_extra = clone(extra), clone(extra)
    a = OPTIMIZERS[name][1](flat, **KWARGS[name], flat=True)
    b = OPTIMIZERS[name][0](ref, **KWARGS[name], foreach=False)
    train(flat, a, 3)
    train(ref, b, 3)
    a.add_param_group({"params": flat_extra, "lr": 2e-3})
    b.add_param_group({"params": ref_extra, "lr": 2e-3})
    assert flat_extra[0].untyped_storage().data_ptr() == flat_extra[1].untyped_storage().data_ptr()
    train(flat + flat_extra, a, 5, first=3)
    train(ref + ref_extra, b, 5, first=3)
    assert spans(a) is not None
    assert_same(flat + flat_extra, a, ref + ref_extra, b, tol=oc.DTYPES_BY_NAME["fp32"])


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_with_torch_both_ways(name):
    """pyfused flat -> torch.optim and torch.optim -> pyfused flat, mid-run: the state dict is
    torch's per-param format (a step tensor per param), and a loaded state is copied into the arena."""
    params = make_params([torch.float32])
    torch_cls, cls = OPTIMIZERS[name]
    runs = [clone(params), clone(params)]
    a = cls(runs[0], **KWARGS[name], flat=True)
    b = torch_cls(runs[1], **KWARGS[name], foreach=False)
    train(runs[0], a, 5)
    train(runs[1], b, 5)
    state_a, state_b = copy.deepcopy(a.state_dict()), copy.deepcopy(b.state_dict())
    assert state_a["state"].keys() == state_b["state"].keys()
    a2 = cls(runs[1], **KWARGS[name], flat=True)  # continues torch's run
    a2.load_state_dict(state_b)
    b2 = torch_cls(runs[0], **KWARGS[name], foreach=False)  # continues pyfused's run
    b2.load_state_dict(state_a)
    train(runs[1], a2, 5, first=5)
    train(runs[0], b2, 5, first=5)
    assert spans(a2) is not None
    arena_states = [t for s in a2.state.values() for k, t in s.items() if k != "step"]
    assert all(t._base is not None for t in arena_states)  # copied into the arena's buffers
    assert_same(runs[1], a2, runs[0], b2, tol=oc.DTYPES_BY_NAME["fp32"])


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler(name):
    """GradScaler's fused protocol (scale in, found_inf): flat=True computes what the default path
    does, bit for bit, and a step with an inf grad changes nothing."""
    params = make_params([torch.float32])
    runs = []
    for flat in (True, False):
        own = clone(params)
        optimizer = OPTIMIZERS[name][1](own, **KWARGS[name], flat=flat)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
        for step in range(8):
            optimizer.zero_grad()
            grads = grads_for(own, step)
            if step == 5:
                grads[2].view(-1)[0] = float("inf")
            scaler.scale(sum((p * g).sum() for p, g in zip(own, grads))).backward()
            scaler.step(optimizer)
            scaler.update()
        runs.append((own, optimizer))
    assert spans(runs[0][1]) is not None
    assert_same(*runs[0], *runs[1])


@pytest.mark.parametrize("deferred", [False, True])
def test_clip_grad_norm(deferred):
    """clip_grad_norm_ on the arena's grad views, in place or deferred into the step's kernel."""
    params = make_params([torch.float32])
    runs = []
    for flat in (True, False):
        own = clone(params)
        optimizer = pyfused.optim.AdamW(own, flat=flat)
        for step in range(6):
            optimizer.zero_grad()
            backward(own, grads_for(own, step))
            if deferred:
                pyfused.nn.utils.clip_grad_norm_(own, 1.0, optimizer=optimizer)
            else:
                torch.nn.utils.clip_grad_norm_(own, 1.0)
            optimizer.step()
        runs.append((own, optimizer))
    assert spans(runs[0][1]) is not None
    assert_same(*runs[0], *runs[1])


def test_lr_scheduler_takes_effect_at_the_next_step():
    params = make_params([torch.float32])
    flat, ref = clone(params), clone(params)
    a = pyfused.optim.AdamW(groups_of(flat, [{}, {"lr": 3e-3}]), flat=True)
    b = torch.optim.AdamW(groups_of(ref, [{}, {"lr": 3e-3}]), foreach=False)
    sa, sb = lr_scheduler.StepLR(a, step_size=2, gamma=0.5), lr_scheduler.StepLR(b, step_size=2, gamma=0.5)
    for step in range(8):
        train(flat, a, 1, first=step)
        train(ref, b, 1, first=step)
        sa.step()
        sb.step()
    assert spans(a) is not None
    assert_same(flat, a, ref, b, tol=oc.DTYPES_BY_NAME["fp32"])


def test_refusals():
    p = torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(RuntimeError, match="capturable=True"):
        pyfused.optim.Adam([p], capturable=True, flat=True)
    flat_param = torch.nn.Parameter(torch.zeros(4))
    flat_param._is_flat_param = True  # what FSDP's FlatParameter carries
    with pytest.raises(RuntimeError, match="FSDP FlatParameter; flat=True needs plain params"):
        pyfused.optim.Adam([flat_param], flat=True)
    base = torch.zeros(8)
    shared = [torch.nn.Parameter(base[:6]), torch.nn.Parameter(base[4:])]
    with pytest.raises(RuntimeError, match="params 0 and 1 of param group 0 share memory"):
        pyfused.optim.Adam(shared, flat=True)
    optimizer = pyfused.optim.Adam([p], flat=True)
    with pytest.raises(RuntimeError, match="capturable=True"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "capturable": True})
    assert len(optimizer.param_groups) == 1  # refused before anything changed
    assert p.detach().equal(torch.zeros(4))


def test_torch_compile_of_the_model_created_after_the_optimizer():
    """The optimizer first (it moves the params into the arena), then torch.compile(model): the
    compiled backward accumulates into the arena's grad views and the fast step stays taken.
    backend="aot_eager": AOTAutograd's joint graph as inductor gets it, run by eager kernels (6 s
    here; inductor passes too, in 40 s, most of it compiling C++ on two cores, and adds nothing:
    the grads reach p.grad through the same AccumulateGrad either way)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.Tanh(), torch.nn.Linear(33, 5))
    ref_model = copy.deepcopy(model)
    a = pyfused.optim.AdamW(model.parameters(), lr=1e-2, flat=True)
    b = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    compiled = torch.compile(model, backend="aot_eager")
    buffer = a._pyfused_arena.grad_buffers[0]
    start = [p.detach().clone() for p in model.parameters()]
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        x = torch.randn(16, 7, generator=generator)
        for run, optimizer in ((compiled, a), (ref_model, b)):
            optimizer.zero_grad()
            run(x).square().mean().backward()
            optimizer.step()
        assert all(p.grad._base is buffer for p in model.parameters())  # still the arena's views
    assert spans(a) is not None  # the later steps took the fast path
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # compiled, once
    # fp32 at torch's fp32 tolerance (AOTAutograd's decomposed backward may round unlike eager's)
    tol = oc.DTYPES_BY_NAME["fp32"]
    for p, q, s in zip(model.parameters(), ref_model.parameters(), start):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=tol.rtol, atol=tol.atol)
        assert not torch.equal(p.detach(), s)
