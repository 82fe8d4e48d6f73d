"""pyfused.optim.swa_utils against torch.optim.swa_utils on CPU (the C++ kernels): the averages,
bit for bit, over many updates, for EMA, SWA and the default, every dtype, odd sizes, tensors that
are not contiguous, buffers averaged or followed; state_dict both ways; custom averaging
functions; errors; the bias-corrected EMA readout; the other instruction sets."""

import copy
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.optim import swa_utils as T

import pyfused
from pyfused.optim import swa_utils as P
from test_optim_stats import CONFIGS as OPTIMIZERS  # the stats tests' realistic hyperparameters

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
SIZES = (0, 1, 7, 65539)  # 65539: several of the driver's chunks and a ragged tail
# name: (torch's multi_avg_fn, ours). decay 0.3 lerps by 0.7, lerp's formula for weights >= 0.5;
# SWA's first weight is 1/2 (that formula), then 1/3, 1/4, ... (the other).
FNS = {
    "ema0.999": (lambda: T.get_ema_multi_avg_fn(0.999), lambda: P.get_ema_multi_avg_fn(0.999)),
    "ema0.3": (lambda: T.get_ema_multi_avg_fn(0.3), lambda: P.get_ema_multi_avg_fn(0.3)),
    "swa": (T.get_swa_multi_avg_fn, P.get_swa_multi_avg_fn),
    "default": (lambda: None, lambda: None),
}


class Net(nn.Module):
    def __init__(self, dtype, sizes=SIZES, int_buffer=False):
        super().__init__()
        gen = torch.Generator().manual_seed(0)

        def randn(*shape):
            return torch.randn(*shape, generator=gen).to(dtype)

        self.flat = nn.ParameterList([nn.Parameter(randn(n)) for n in sizes])
        self.transposed = nn.Parameter(randn(13, 5).t())  # dense, not contiguous: fused
        self.strided = nn.Parameter(randn(9, 8)[:, ::2])  # not dense (its copy is): torch's code
        self.register_buffer("running", randn(33))
        self.register_buffer("empty", randn(0))
        if int_buffer:
            self.register_buffer("count", torch.tensor(3))


def perturb(model, gen, scale=0.1):
    """One training step's worth of change, to params and float buffers alike."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.add_((torch.randn(t.shape, generator=gen) * scale).to(t.dtype))
            else:
                t.add_(1)


def update_together(model, averages, updates, seed):
    """Perturbs the model `updates` times, each time updating every average from it."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(updates):
        perturb(model, gen)
        for average in averages:
            average.update_parameters(model)


def assert_same(theirs, ours):
    a, b = theirs.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].stride() == b[key].stride(), key
        # Bit for bit: the same roundings as torch's ops, in the same order (module docstring).
        assert torch.equal(a[key], b[key]), (key, (a[key].double() - b[key].double()).abs().max())


def run_pair(model, fn, use_buffers, updates=25, seed=1, between=None):
    make_theirs, make_ours = FNS[fn]
    theirs = T.AveragedModel(model, multi_avg_fn=make_theirs(), use_buffers=use_buffers)
    ours = P.AveragedModel(model, multi_avg_fn=make_ours(), use_buffers=use_buffers)
    gen = torch.Generator().manual_seed(seed)
    for k in range(updates):
        perturb(model, gen)
        theirs.update_parameters(model)
        ours.update_parameters(model)
        if between is not None:
            between(k, theirs, ours)
    return theirs, ours


@pytest.mark.parametrize("use_buffers", [False, True], ids=["params", "buffers"])
@pytest.mark.parametrize("fn", list(FNS))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_matches_torch(dtype, fn, use_buffers):
    model = Net(dtype)
    theirs, ours = run_pair(model, fn, use_buffers)
    assert_same(theirs, ours)
    assert int(ours.n_averaged) == int(theirs.n_averaged) == 25
    # The kernels ran: every pair fused but the strided param's, in one group for the one dtype.
    plan = ours._plan
    assert len(plan.groups) == 1 and plan.groups[0].dtype == dtype
    averaged = list(ours.module.parameters()) + (list(ours.module.buffers()) if use_buffers else [])
    assert [averaged[i] is ours.module.strided for i in plan.rest] == [True]


def test_mixed_dtypes_int_buffers_and_a_model_that_moves():
    """Several (device, dtype) groups; an integer buffer (torch's non-float path) averaged with
    EMA and the default; params replaced between updates on either side (the plan is rebuilt)."""
    model = Net(torch.float32, int_buffer=True)
    model.flat[1] = nn.Parameter(torch.randn(7, dtype=torch.float64))
    model.flat[2] = nn.Parameter(torch.randn(300, dtype=torch.bfloat16))

    def replace(k, theirs, ours):
        if k == 5:
            model.flat[3].data = model.flat[3].data.clone()  # a new address on the model's side
        if k == 9:
            for m in (theirs, ours):
                m.module.flat[2].data = m.module.flat[2].data.clone()

    for fn in ("ema0.3", "default"):
        theirs, ours = run_pair(model, fn, use_buffers=True, between=replace)
        assert_same(theirs, ours)
        assert {g.dtype for g in ours._plan.groups} == {torch.float32, torch.float64, torch.bfloat16}


def test_swa_weight_follows_the_default_dtype():
    """torch's SWA weight 1 / (n_averaged + 1) divides the long counter in the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        theirs, ours = run_pair(Net(torch.float64), "swa", use_buffers=True, updates=12)
    finally:
        torch.set_default_dtype(old)
    assert_same(theirs, ours)


def test_model_tensors_sharing_memory_are_read_as_torch_reads_them():
    base = torch.randn(100)
    model = nn.Module()
    model.a = nn.Parameter(base[:60])
    model.b = nn.Parameter(base[40:])  # overlaps a: only read, so still fused
    theirs, ours = run_pair(model, "ema0.999", use_buffers=False)
    assert_same(theirs, ours)
    assert len(ours._plan.groups[0].indices) == 2


def test_averages_sharing_memory_take_torch_path():
    model = nn.Module()
    model.a, model.b = nn.Parameter(torch.randn(50)), nn.Parameter(torch.randn(50))
    theirs = T.AveragedModel(model, multi_avg_fn=T.get_ema_multi_avg_fn(0.5))
    ours = P.AveragedModel(model, multi_avg_fn=P.get_ema_multi_avg_fn(0.5))
    base = torch.randn(80)
    for m in (theirs, ours):  # after the copy, the averages share memory: the order decides
        m.module.a.data, m.module.b.data = base[:50].clone(), base[:50].clone()
        store = torch.randn(80)
        m.module.a.data, m.module.b.data = store[:50], store[30:]
    ours.module.a.data.copy_(theirs.module.a.data)
    ours.module.b.data.copy_(theirs.module.b.data)
    theirs.n_averaged.fill_(1)
    ours.n_averaged.fill_(1)
    update_together(model, (theirs, ours), 3, seed=0)
    assert ours._plan.overlap
    assert_same(theirs, ours)


class Shapes(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.flat = nn.Parameter(torch.randn(64, generator=gen).to(dtype))
        self.square = nn.Parameter(torch.randn(8, 8, generator=gen).to(dtype))
        self.cube = nn.Parameter(torch.randn(3, 3, 2, generator=gen).to(dtype).permute(2, 0, 1))  # dense, strided
        self.register_buffer("running", torch.randn(33, generator=gen).to(dtype))


class Traced(nn.Parameter):
    """A param type the kernels do not take: torch's code runs, through its __torch_function__."""
    calls = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls.append(func)
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        return out.as_subclass(cls) if func is torch.Tensor.detach else out  # torch's lerp then meets it


def _view_as(name, dtype):
    def change(model, averages):
        for m in [model, *averages]:
            t = getattr(m, name)
            t.data = t.data.view(dtype)
    return change


# Each a change after the plan was built that one of its checks (_Plan.unchanged) alone catches,
# most at the same address; torch's result or error is the reference.
CHANGES = {
    "replaced, same memory (identity)": lambda model, _: setattr(model, "flat", Traced(model.flat.data)),
    "removed (identity, lengths)": lambda model, _: delattr(model, "square"),
    "data replaced (address)": lambda model, _: setattr(model.flat, "data", model.flat.data.clone()),
    "average's data replaced (address)": lambda _, avgs: [setattr(m.flat, "data", m.flat.data.clone()) for m in avgs],
    "model.to (address)": lambda model, _: model.to(torch.float64),
    "viewed as another dtype (dtype)": _view_as("flat", torch.bfloat16),
    "viewed as another shape (sizes)": lambda model, _: setattr(model.square, "data", model.square.data.view(4, 16)),
    "buffer resized in place (sizes)": lambda model, _: model.running.resize_(10),
    "transposed (contiguity)": lambda model, _: setattr(model.square, "data", model.square.data.t()),
    "strided otherwise (strides)": lambda model, _: setattr(model.cube, "data", model.cube.data.transpose(1, 2)),
}


@pytest.mark.parametrize("use_buffers", [False, True], ids=["params", "buffers"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_tensor_changed_after_the_plan_was_built(change, use_buffers):
    model = Shapes(torch.float16 if "dtype" in change else torch.float32)
    theirs = T.AveragedModel(model, multi_avg_fn=T.get_ema_multi_avg_fn(0.3), use_buffers=use_buffers)
    ours = P.AveragedModel(model, multi_avg_fn=P.get_ema_multi_avg_fn(0.3), use_buffers=use_buffers)
    update_together(model, (theirs, ours), 3, seed=3)  # the copy, then two fused updates
    assert ours._plan is not None and ours._plan.groups
    CHANGES[change](model, [theirs.module, ours.module])
    gen = torch.Generator().manual_seed(4)
    for _ in range(2):
        perturb(model, gen)
        lerped = []  # whether torch's lerp ran through Traced's __torch_function__
        for m in (theirs, ours):
            Traced.calls.clear()
            lerped.append((error_of(lambda: m.update_parameters(model)), torch._foreach_lerp_ in Traced.calls))
        assert lerped[0] == lerped[1]
        if lerped[0][0] is not None:
            # torch's foreach loop has lerped the pairs before the one it refuses; ours has not
            # moved any (it validates first), so only the errors compare.
            return
    assert_same(theirs, ours)


@pytest.mark.parametrize("direction", ["torch-to-pyfused", "pyfused-to-torch"])
def test_state_dict_interchange(direction):
    model = Net(torch.float32)
    gen = torch.Generator().manual_seed(2)
    source_cls, target_cls = (T, P) if direction == "torch-to-pyfused" else (P, T)
    source = source_cls.AveragedModel(model, multi_avg_fn=source_cls.get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(6):
        perturb(model, gen)
        source.update_parameters(model)
    target = target_cls.AveragedModel(Net(torch.float32), multi_avg_fn=target_cls.get_ema_multi_avg_fn(0.9),
                                      use_buffers=True)
    target.load_state_dict(source.state_dict())
    assert int(target.n_averaged) == 6
    for _ in range(6):
        perturb(model, gen)
        source.update_parameters(model)
        target.update_parameters(model)
    theirs, ours = (source, target) if source_cls is T else (target, source)
    assert_same(theirs, ours)


def test_custom_functions_run_as_torch_runs_them():
    def avg_fn(avg, cur, n):
        return avg * 0.25 + cur * 0.75

    def multi_avg_fn(avgs, curs, n):
        for a, c in zip(avgs, curs):
            a.mul_(0.5).add_(c, alpha=0.5)

    for kwargs in (dict(avg_fn=avg_fn), dict(multi_avg_fn=multi_avg_fn),
                   dict(multi_avg_fn=T.get_ema_multi_avg_fn(0.9))):  # torch's own: not ours, so torch's path
        model = Net(torch.float32)
        theirs = T.AveragedModel(model, **kwargs)
        ours = P.AveragedModel(model, **kwargs)
        update_together(model, (theirs, ours), 4, seed=3)
        assert_same(theirs, ours)
        assert ours._plan is None


def test_our_functions_are_torch_functions_when_called():
    """Called directly (or by torch's own AveragedModel), our functions compute torch's."""
    model = Net(torch.float32)
    for fn in ("ema0.3", "swa"):
        theirs = T.AveragedModel(model, multi_avg_fn=FNS[fn][0]())
        hybrid = T.AveragedModel(model, multi_avg_fn=FNS[fn][1]())
        update_together(model, (theirs, hybrid), 4, seed=4)
        assert_same(theirs, hybrid)


def test_reexports_are_torchs():
    for name in ("SWALR", "update_bn", "get_ema_avg_fn", "get_swa_avg_fn"):
        assert getattr(P, name) is getattr(T, name)
    assert issubclass(P.AveragedModel, T.AveragedModel)


def error_of(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the type and message are what is compared
        return type(error), str(error)
    return None


def test_errors_match_torchs():
    model = Net(torch.float32)
    for mod in (T, P):
        assert error_of(lambda: mod.get_ema_multi_avg_fn(1.5)) == (
            ValueError, "Invalid decay value 1.5 provided. Please provide a value in [0,1] range.")
        assert error_of(lambda: mod.AveragedModel(model, avg_fn=T.get_swa_avg_fn(),
                                                  multi_avg_fn=mod.get_swa_multi_avg_fn())) == (
            AssertionError, "Only one of avg_fn and multi_avg_fn should be provided")

    def second_update(mod, make_model, fn, use_buffers, change=None):
        source = make_model()
        averaged = mod.AveragedModel(source, multi_avg_fn=fn, use_buffers=use_buffers)
        averaged.update_parameters(source)
        if change is not None:
            change(source)
        return error_of(lambda: averaged.update_parameters(source))

    cases = [
        # SWA's foreach path on an integer buffer: torch's addcdiv refuses it
        (lambda: Net(torch.float32, int_buffer=True), "swa", True, None),
        # the model gains a buffer: torch's strict zip of the buffers refuses it
        (lambda: Net(torch.float32), "ema0.3", False, lambda m: m.register_buffer("extra", torch.zeros(2))),
        # the model's params change dtype (the averages keep theirs): torch's code decides
        (lambda: Net(torch.float32), "ema0.3", False, lambda m: m.double()),
        (lambda: Net(torch.float32), "default", False, lambda m: m.double()),
    ]
    for make_model, fn, use_buffers, change in cases:
        theirs = second_update(T, make_model, FNS[fn][0](), use_buffers, change)
        ours = second_update(P, make_model, FNS[fn][1](), use_buffers, change)
        assert theirs == ours


def test_counts_and_devices_as_torch():
    model = Net(torch.float32)
    theirs = T.AveragedModel(model, device="cpu")
    ours = P.AveragedModel(model, device="cpu")
    for m in (theirs, ours):
        m.n_averaged.fill_(-2)  # a negative count: torch neither copies nor averages, but counts
    update_together(model, (theirs, ours), 5, seed=5)
    assert_same(theirs, ours)
    assert int(ours.n_averaged) == 3
    with torch.device("meta"):  # no memory: torch's code, which does nothing to meta tensors
        meta = Net(torch.float32)
    averaged = P.AveragedModel(meta, multi_avg_fn=P.get_ema_multi_avg_fn())
    averaged.update_parameters(meta)
    averaged.update_parameters(meta)
    assert averaged._plan.groups == [] and int(averaged.n_averaged) == 2


def test_forced_torch_backend_is_torchs_code():
    model = Net(torch.float32)
    with pyfused.use_backend("torch"):
        theirs, ours = run_pair(model, "ema0.3", use_buffers=True, updates=4)
    assert_same(theirs, ours)


# --- the bias-corrected EMA -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype, rtol", [
    (torch.float64, 1e-12),  # the average's own roundings over 12 lerps, and the readout's
    (torch.float32, 2e-6),  # 12 lerps in float32, each within half an ulp, against float64
])
def test_bias_corrected_is_the_zero_started_ema_over_one_minus_decay_power(dtype, rtol):
    decay = 0.8
    model = Net(dtype, sizes=(5, 300))
    ours = P.AveragedModel(model, multi_avg_fn=P.get_ema_multi_avg_fn(decay), use_buffers=True,
                           bias_correction=True)
    gen = torch.Generator().manual_seed(6)
    v = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in ours.module.state_dict().items()}
    for t in range(1, 13):
        perturb(model, gen)
        ours.update_parameters(model)
        for name, x in model.state_dict().items():  # the lecture's EMA, from zero, in float64
            v[name] = decay * v[name] + (1 - decay) * x.double()
        corrected = ours.bias_corrected()
        assert set(corrected) == set(v)
        for name, value in corrected.items():
            expected = v[name] / (1 - decay**t)
            assert value.dtype == dtype
            torch.testing.assert_close(value.double(), expected, rtol=rtol, atol=rtol)
    # not written into the average: that is still torch's EMA
    theirs = T.AveragedModel(Net(dtype, sizes=(5, 300)), multi_avg_fn=T.get_ema_multi_avg_fn(decay),
                             use_buffers=True)
    theirs.load_state_dict(ours.state_dict())
    assert not all(torch.equal(corrected[k], ours.module.state_dict()[k]) for k in corrected)


def test_bias_corrected_errors():
    model = Net(torch.float32, sizes=(3,))
    plain = P.AveragedModel(model, multi_avg_fn=P.get_ema_multi_avg_fn(0.9))
    plain.update_parameters(model)
    with pytest.raises(RuntimeError, match="bias_correction=True"):
        plain.bias_corrected()
    swa = P.AveragedModel(model, bias_correction=True)
    with pytest.raises(ValueError, match="get_ema_multi_avg_fn"):
        swa.bias_corrected()
    ema = P.AveragedModel(model, multi_avg_fn=P.get_ema_multi_avg_fn(1.0), bias_correction=True)
    ema.update_parameters(model)
    with pytest.raises(ValueError, match="nothing to correct"):
        ema.bias_corrected()
    ema.load_state_dict(copy.deepcopy(ema.state_dict()))
    with pytest.raises(RuntimeError, match="load_state_dict drops"):
        ema.bias_corrected()


# --- the other instruction sets -------------------------------------------------------------------

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("isa, env", [
    ("avx2", {}),
    # torch without FMA rounds lerp's multiply and add apart, as the baseline build does
    ("baseline", {"ATEN_CPU_CAPABILITY": "default"}),
])
def test_matches_torch_with_each_instruction_set(isa, env):
    if isa == "avx2" and subprocess.run([sys.executable, "-c", "import pyfused._cpp"], env={
            **os.environ, "PYFUSED_CPU_ISA": "avx2"}, capture_output=True).returncode != 0:
        pytest.skip("this CPU has no AVX2 and FMA")
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", str(HERE / "test_swa_utils.py"),
         "-k", "test_matches_torch and not instruction_set"],
        env={**os.environ, "PYFUSED_CPU_ISA": isa, **env}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout


def test_walks_the_tensors_torch_walks():
    """update_parameters lists params and buffers without torch's generators: same tensors, same
    order, with shared modules, tied params, None entries; a class that walks its own way is asked."""
    shared = nn.Linear(3, 4, bias=False)  # registers bias as None
    model = nn.Sequential(shared, nn.BatchNorm1d(4), nn.Sequential(shared, nn.Linear(4, 4)), nn.Linear(4, 3))
    model[3].weight = model[2][1].weight  # tied
    model.register_buffer("none", None)

    class OwnWalk(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.ones(2))

        def parameters(self, recurse=True):
            return iter([self.b])

    for m in (model, OwnWalk(), T.AveragedModel(model)):
        assert P._Walked(m, "_parameters").each == list(m.parameters())
        assert P._Walked(m, "_buffers").each == list(m.buffers())
    assert len(P._Walked(model, "_parameters").each) == 6  # the shared Linear and the tied weight once


class Hidden(nn.Linear):
    """Walks its own way: its parent's named_modules() does not list it."""

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        return iter(())


def _replace_dict(m):  # the old dict stays as it was: only its identity shows the change
    object.__setattr__(m[0], "_parameters", {**m[0]._parameters, "bias": nn.Parameter(torch.zeros(4))})


# Each a change to the module tree that _Walked must see: by a dict's version, its identity or a
# module's type ("same param written again" changes no tensor).
WALK_CHANGES = {
    "param replaced": lambda m: setattr(m[0], "weight", nn.Parameter(torch.zeros(4, 3))),
    "param deleted": lambda m: delattr(m[2][0], "bias"),
    "module added": lambda m: m.append(nn.Linear(3, 3)),
    "module replaced": lambda m: m.__setitem__(2, nn.Linear(4, 4)),
    "dict replaced": _replace_dict,
    "class changed": lambda m: setattr(m[0], "__class__", Hidden),
    "same param written again": lambda m: setattr(m[0], "weight", m[0].weight),
    "buffer registered": lambda m: m[1].register_buffer("extra", torch.zeros(2)),
    # An empty dict filled by update(): Python 3.12+'s dict watchers send an event torch's
    # dict_version skips (_fused._usable_dict_version then turns the versions off).
    "empty buffers updated": lambda m: m[0]._buffers.update({"extra": torch.zeros(2)}),
}


@pytest.mark.parametrize("change", list(WALK_CHANGES))
def test_walks_kept_while_the_modules_are_unchanged(change):
    """_Walked keeps its lists while the module tree's dicts are unwritten, and walks anew after
    any change to which tensors torch's parameters() or buffers() list."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Sequential(nn.Linear(4, 4)))
    walks = {kind: P._Walked(model, kind) for kind in ("_parameters", "_buffers")}
    before = {kind: list(map(id, w.each)) for kind, w in walks.items()}
    # The lists are kept (not walked anew each call) wherever dict_version works.
    assert all(w.versions is not None for w in walks.values()) == (P._dict_version is not None)
    assert all(w.same(model) for w in walks.values())
    WALK_CHANGES[change](model)
    for kind, listed in (("_parameters", model.parameters()), ("_buffers", model.buffers())):
        listed = list(map(id, listed))  # tensors compare by identity
        assert walks[kind].same(model) == (listed == before[kind])
        assert list(map(id, walks[kind].each)) == listed and list(map(id, walks[kind].each_of(model))) == listed
    if change == "class changed":
        assert walks["_parameters"].versions is None  # a class that walks its own way is asked each time


class _Dispatching(nn.Parameter):
    """A subclass torch dispatches through: the kernels must not bypass it."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_class_change_breaks_the_layout():
    """A tensor whose class changed fails the guard and the metadata fallback alike."""
    t = nn.Parameter(torch.zeros(3))
    layout = P._Layout([t], guard=True)
    assert layout.unchanged()
    t.__class__ = _Dispatching
    assert not layout.unchanged()


def test_a_requires_grad_change_keeps_the_plan():
    """requires_grad is in the metadata guard, not in what the kernels read: the plan stays."""
    model = Shapes(torch.float32)
    theirs = T.AveragedModel(model, multi_avg_fn=T.get_ema_multi_avg_fn(0.3))
    ours = P.AveragedModel(model, multi_avg_fn=P.get_ema_multi_avg_fn(0.3))
    update_together(model, (theirs, ours), 3, seed=3)
    plan = ours._plan
    model.square.requires_grad_(False)
    update_together(model, (theirs, ours), 2, seed=4)
    assert ours._plan is plan
    assert_same(theirs, ours)


# average= of the optimizers: the step lerps the averages in its kernel pass (swa_utils._StepAverage).
STEP_FNS = {  # decay 0.9: weight 0.1 (lerp's first formula); SWA's first weight 1/2 (the other)
    "ema0.999": FNS["ema0.999"],
    "ema0.9": (lambda: T.get_ema_multi_avg_fn(0.9), lambda: P.get_ema_multi_avg_fn(0.9)),
    "swa": FNS["swa"],
}


class StepNet(nn.Module):
    """Odd sizes in two param groups (the second with 10x the lr), and a buffer the average copies."""

    def __init__(self, dtype, sizes=SIZES):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.flat = nn.ParameterList([nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in sizes])
        self.transposed = nn.Parameter(torch.randn(13, 5, generator=gen).to(dtype).t())
        self.register_buffer("running", torch.randn(33, generator=gen).to(dtype))

    def groups(self, lr):
        params = list(self.parameters())
        return [dict(params=params[:2]), dict(params=params[2:], lr=lr * 10)]


def step_pair(name, fn, dtype, steps=20, seed=2, fused_options=None, between=None):
    """Two copies of a model stepped alike: one with average= (fused), one stepped and then
    averaged by torch's AveragedModel.update_parameters. Returns both models and averages."""
    make_theirs, make_ours = STEP_FNS[fn] if fn in STEP_FNS else FNS[fn]
    kwargs = OPTIMIZERS[name]
    fused_model, plain_model = StepNet(dtype), StepNet(dtype)
    ours = P.AveragedModel(fused_model, multi_avg_fn=make_ours())
    ours.calls = 0  # update_parameters calls: 0 where the step's kernels average
    update = ours.update_parameters

    def counted(model):
        ours.calls += 1
        update(model)

    ours.update_parameters = counted
    theirs = T.AveragedModel(plain_model, multi_avg_fn=make_theirs())
    fused_opt = getattr(pyfused.optim, name)(fused_model.groups(kwargs["lr"]), **kwargs, average=ours,
                                             **(fused_options or {}))
    plain_opt = getattr(pyfused.optim, name)(plain_model.groups(kwargs["lr"]), **kwargs)
    gen = torch.Generator().manual_seed(seed)
    for k in range(steps):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in plain_model.parameters()]
        for model in (fused_model, plain_model):
            for p, g in zip(model.parameters(), grads):
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)  # flat=True keeps its grads as views of the arena
            model.running.add_(0.5)
        fused_opt.step()
        plain_opt.step()
        theirs.update_parameters(plain_model)
        if between is not None:
            between(k, fused_opt, ours)
    return (fused_model, ours, fused_opt), (plain_model, theirs)


def assert_step_average(fused, plain, steps=20):
    (fused_model, ours, _), (plain_model, theirs) = fused, plain
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)  # the same kernel stepped both
    # Bit for bit, every dtype: the kernel lerps the param as stored (the value torch's lerp reads)
    # with lerp() of csrc/optimizers.h, which rounds as torch's CPU lerp on an FMA machine (one fma
    # in opmath, then one rounding to the storage type); fp32 is therefore exact, not within an ulp.
    assert_same(theirs, ours)
    assert int(ours.n_averaged) == int(theirs.n_averaged) == steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
@pytest.mark.parametrize("fn", list(STEP_FNS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_average_is_step_then_update_parameters(name, fn, dtype):
    fused, plain = step_pair(name, fn, dtype)
    assert_step_average(fused, plain)
    assert fused[1].calls == 1  # fused: update_parameters ran only for the first update, a copy


@pytest.mark.parametrize("options", [dict(flat=True), dict(track_stats=True), dict(flat=True, track_stats=True)],
                         ids=["flat", "stats", "flat-stats"])
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_step_average_with_flat_and_stats(name, options):
    fused, plain = step_pair(name, "ema0.9", torch.float32, fused_options=options)
    assert_step_average(fused, plain)
    assert fused[1].calls == 1
    if options.get("track_stats"):
        assert len(fused[2].stats) == len(list(fused[0].parameters()))


@pytest.mark.parametrize("fn", ["default", "custom"])
def test_step_average_falls_back_to_update_parameters(fn):
    """The default on CPU divides (torch's get_swa_avg_fn), and a custom function is the user's:
    the step calls update_parameters after the update, with the same result."""
    custom = lambda a, m, n: torch._foreach_lerp_(a, m, 0.25)  # noqa: E731
    if fn == "custom":
        FNS["custom"] = (lambda: custom, lambda: custom)
    try:
        fused, plain = step_pair("Adam", fn, torch.float32, steps=6)
    finally:
        FNS.pop("custom", None)
    assert_step_average(fused, plain, steps=6)
    assert fused[1].calls == 6  # update_parameters ran after each step


def test_step_average_with_a_param_without_grad_and_use_buffers():
    """A param without a grad is averaged all the same (update_parameters would), and
    use_buffers=True averages the buffers: both take update_parameters after the step."""
    for use_buffers in (False, True):
        models = [StepNet(torch.float32) for _ in range(2)]
        ours = P.AveragedModel(models[0], multi_avg_fn=P.get_ema_multi_avg_fn(0.9), use_buffers=use_buffers)
        theirs = T.AveragedModel(models[1], multi_avg_fn=T.get_ema_multi_avg_fn(0.9), use_buffers=use_buffers)
        opts = [pyfused.optim.Adam(models[0].parameters(), lr=0.1, average=ours),
                pyfused.optim.Adam(models[1].parameters(), lr=0.1)]
        for k in range(5):
            for model in models:
                for i, p in enumerate(model.parameters()):
                    p.grad = None if (i == 2 and k % 2) else torch.full_like(p, 0.1 * (k + i))
                model.running.mul_(0.9)
            for opt in opts:
                opt.step()
            theirs.update_parameters(models[1])
        assert_same(theirs, ours)
        assert int(ours.n_averaged) == 5


def test_step_average_after_a_skipped_gradscaler_step():
    model = StepNet(torch.float32)
    ours = P.AveragedModel(model, multi_avg_fn=P.get_ema_multi_avg_fn(0.9))
    opt = pyfused.optim.Adam(model.parameters(), lr=0.1, average=ours)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    gen = torch.Generator().manual_seed(0)
    for k in range(4):
        for p in model.parameters():
            p.grad = scaler.scale(torch.randn(p.shape, generator=gen))
        if k == 2:
            model.flat[3].grad[100] = float("inf")
            before = copy.deepcopy(ours.state_dict())
        scaler.step(opt)
        scaler.update()
        if k == 2:
            after = ours.state_dict()
            assert all(torch.equal(before[key], after[key]) for key in before)
            assert int(ours.n_averaged) == 2
    assert int(ours.n_averaged) == 3


def test_step_average_errors():
    model = StepNet(torch.float32)
    with pytest.raises(TypeError, match="pyfused.optim.swa_utils.AveragedModel"):
        pyfused.optim.SGD(model.parameters(), lr=0.1, average=T.AveragedModel(model))
    averaged = P.AveragedModel(model)
    with pytest.raises(ValueError, match="exactly the optimizer.s params: the model has 5, the optimizer 4"):
        pyfused.optim.SGD(list(model.parameters())[1:], lr=0.1, average=averaged)
    with pytest.raises(ValueError, match="exactly the optimizer's params"):
        pyfused.optim.SGD(list(model.parameters()) + [nn.Parameter(torch.ones(3))], lr=0.1, average=averaged)
    with pytest.raises(TypeError, match="param 0: the average is torch.float64, the param torch.float32"):
        pyfused.optim.SGD(model.parameters(), lr=0.1, average=P.AveragedModel(model).double())
    with pytest.raises(ValueError, match=r"meta\) is not laid out as the param"):
        pyfused.optim.SGD(model.parameters(), lr=0.1, average=P.AveragedModel(model, device="meta"))
    moved = P.AveragedModel(model)
    moved.module.transposed.data = moved.module.transposed.data.contiguous()
    with pytest.raises(ValueError, match="strides"):
        pyfused.optim.SGD(model.parameters(), lr=0.1, average=moved)
    # An average in the param's own memory: refused at the step, before anything moves (past the
    # first update, which update_parameters' copy makes).
    shared = P.AveragedModel(model, multi_avg_fn=P.get_ema_multi_avg_fn(0.5))
    opt = pyfused.optim.SGD(model.parameters(), lr=0.1, average=shared)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    shared.module.flat[3].data = model.flat[3].data
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="shares memory with a param or state tensor"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert int(shared.n_averaged) == 1


def test_step_average_on_torchs_backend_is_update_parameters():
    """PYFUSED_BACKEND=torch: torch's step, then update_parameters; a skipped step skips both."""
    models = [StepNet(torch.float32) for _ in range(2)]
    ours = P.AveragedModel(models[0], multi_avg_fn=P.get_ema_multi_avg_fn(0.9))
    theirs = T.AveragedModel(models[1], multi_avg_fn=T.get_ema_multi_avg_fn(0.9))
    opts = [pyfused.optim.SGD(models[0].parameters(), lr=0.1, average=ours),
            torch.optim.SGD(models[1].parameters(), lr=0.1, foreach=False)]
    with pyfused.use_backend("torch"):
        for k in range(3):
            for model, opt in zip(models, opts):
                for p in model.parameters():
                    p.grad = torch.full_like(p, 0.1 * k)
                opt.step()
            theirs.update_parameters(models[1])
        opts[0].found_inf = torch.ones(())
        opts[0].step()
    assert_same(theirs, ours)


def sgd_pair(change, steps=6, at=2, **options):
    """A StepNet stepped by SGD with average= (EMA 0.5), and a copy stepped by SGD and averaged
    by torch's AveragedModel; change(model, averaged) runs on both sides after `at` steps."""
    models = [StepNet(torch.float32) for _ in range(2)]
    ours = P.AveragedModel(models[0], multi_avg_fn=P.get_ema_multi_avg_fn(0.5))
    theirs = T.AveragedModel(models[1], multi_avg_fn=T.get_ema_multi_avg_fn(0.5))
    opts = [pyfused.optim.SGD(models[0].parameters(), lr=0.1, average=ours, **options),
            pyfused.optim.SGD(models[1].parameters(), lr=0.1)]
    gen = torch.Generator().manual_seed(3)
    for k in range(steps):
        if k == at:
            change(models[0], ours)
            change(models[1], theirs)
        grads = [torch.randn(p.shape, generator=gen) for p in models[0].parameters()]
        for model, opt in zip(models, opts):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.to(p.dtype)
            opt.step()
        theirs.update_parameters(models[1])
    assert int(ours.n_averaged) == steps
    assert_same(theirs, ours)
    for a, b in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b)


def _assign_loaded(model, averaged):
    averaged.load_state_dict({k: v.clone() for k, v in averaged.state_dict().items()}, assign=True)


def _new_average_param(model, averaged):
    averaged.module.transposed = nn.Parameter(averaged.module.transposed.detach().clone())
    averaged.module.flat[2] = nn.Parameter(averaged.module.flat[2].detach().clone())


def _both_double(model, averaged):
    model.double()
    averaged.module.double()


def _moved_average(model, averaged):
    averaged.module.flat[3].data = averaged.module.flat[3].data.clone()


@pytest.mark.parametrize("change", [_assign_loaded, _new_average_param, _both_double, _moved_average],
                         ids=["load_state_dict-assign", "new-parameter", "both-double", "average-moved"])
@pytest.mark.parametrize("flat", [False, True], ids=["tables", "flat"])
def test_step_average_follows_a_changed_average_or_model(change, flat):
    """New average objects (load_state_dict(assign=True), a Parameter assigned into the copy), or
    both sides moved to another dtype: the step pairs them anew, and keeps matching torch."""
    sgd_pair(change, flat=flat)


_CHANGES = {
    # statement, error, message; the averaged copy to fp16: unchecked, fp32 written into half the bytes
    "average-half": ("ours.module.half()", "TypeError",
                     "param 0: the average is torch.float16, the param torch.float32"),
    "model-double": ("model.double()", "TypeError", "param 0: the average is torch.float32, the param torch.float64"),
    "average-resized": ("ours.module.flat[3].data = torch.zeros(3)", "ValueError", "param 4: the average \\(\\(3,\\)"),
    # the same address, fewer elements (only the sizes show it)
    "average-narrowed": ("ours.module.flat[3].data = ours.module.flat[3].data[:3]", "ValueError",
                         "param 4: the average \\(\\(3,\\)"),
    "param-double": ("model.flat[2].data = model.flat[2].data.double()", "TypeError", "param 3: the average is "
                     "torch.float32, the param torch.float64"),
    # a new dict of params in the copy's ParameterList: the old dict, unwritten, shows nothing
    "average-dict-replaced": ("object.__setattr__(ours.module.flat, '_parameters', {**ours.module.flat._parameters, "
                              "'3': nn.Parameter(torch.zeros(3))})", "ValueError", "param 4: the average \\(\\(3,\\)"),
    "model-new-parameter": ("model.flat[2] = nn.Parameter(model.flat[2].detach().clone())", "ValueError",
                            "1 of the optimizer's not in the model"),
}


@pytest.mark.parametrize("flat", [False, True], ids=["tables", "flat"])
@pytest.mark.parametrize("change", list(_CHANGES))
def test_step_average_refuses_a_changed_pairing(change, flat):
    """One side changed so that an average no longer matches its param: the step refuses before
    anything moves. In a subprocess: unchecked, the kernel writes out of the average's bounds."""
    statement, error, message = _CHANGES[change]
    script = f"""
import re, sys, torch
from torch import nn
import pyfused
from pyfused.optim import swa_utils as P
sys.path.insert(0, 'tests')  # as pytest imports the test modules
from test_swa_utils import StepNet
model = StepNet(torch.float32)
ours = P.AveragedModel(model, multi_avg_fn=P.get_ema_multi_avg_fn(0.5))
opt = pyfused.optim.SGD(model.parameters(), lr=0.1, average=ours, flat={flat})
for k in range(3):
    if k == 2:
        {statement}
        before = [t.clone() for t in list(model.parameters()) + list(ours.parameters())]
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    try:
        opt.step()
    except {error} as e:
        assert k == 2 and re.search({message!r}, str(e)), (k, e)
        after = list(model.parameters()) + list(ours.parameters())
        assert all(torch.equal(a, b) for a, b in zip(before, after)) and int(ours.n_averaged) == 2
        print("refused")
"""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.split() == ["refused"], done.stdout + done.stderr


def test_step_average_overlap_check_counts_each_rows_bytes():
    """A complex param: the bucket's rows count real elements, the average its own: an average
    right after its param's last byte is apart, one element into it shares memory."""
    model = nn.Module()
    storage = torch.zeros(2 * 5 + 1, dtype=torch.complex64)
    model.w = nn.Parameter(storage[:5])
    ours = P.AveragedModel(model, multi_avg_fn=P.get_ema_multi_avg_fn(0.5))
    ours.module.w.data = storage[5:10]
    opt = pyfused.optim.SGD(model.parameters(), lr=0.5, average=ours)
    model.w.grad = torch.full((5,), -1 - 2j)
    for _ in range(2):
        opt.step()
    assert torch.equal(model.w.detach(), torch.full((5,), 1 + 2j))
    assert torch.equal(ours.module.w.detach(), torch.full((5,), 0.75 + 1.5j))  # copy 0.5+1j, then half way
    ours.module.w.data = storage[4:9]
    with pytest.raises(RuntimeError, match="shares memory with a param or state tensor"):
        opt.step()


def test_step_average_with_frozen_params_left_out_is_update_parameters():
    """Fine-tuning: frozen params (requires_grad=False) outside the optimizer are averaged all the
    same, as update_parameters(model) after the step averages them: the step calls it."""
    models = [StepNet(torch.float32) for _ in range(2)]
    for model in models:
        model.flat[1].requires_grad_(False)
    ours = P.AveragedModel(models[0], multi_avg_fn=P.get_ema_multi_avg_fn(0.5))
    theirs = T.AveragedModel(models[1], multi_avg_fn=T.get_ema_multi_avg_fn(0.5))
    calls = []
    update = ours.update_parameters
    ours.update_parameters = lambda model: (calls.append(1), update(model))
    opts = [pyfused.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1, average=average)
            for model, average in ((models[0], ours), (models[1], None))]
    for k in range(4):
        for model, opt in zip(models, opts):
            for i, p in enumerate(model.parameters()):
                p.grad = torch.full_like(p, 0.1 * (k + i)) if p.requires_grad else None
            with torch.no_grad():
                model.flat[1].add_(1.0)  # moves all the same (the average must follow it)
            opt.step()
        theirs.update_parameters(models[1])
    assert_same(theirs, ours)
    assert len(calls) == 4 and int(ours.n_averaged) == 4


def _pickled(m):
    return pickle.loads(pickle.dumps(m))


def _saved(m):
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", [_pickled, _saved, copy.deepcopy], ids=["pickle", "torch.save", "deepcopy"])
def test_pickles_and_copies_as_torchs(how):
    """pickle, torch.save and deepcopy work as for torch's AveragedModel, without the model's
    tensors (the fused plan's), and the copy goes on averaging as torch's."""
    model = Net(torch.float32)
    for fn in ("default", "swa", "ema0.3"):  # torch's own EMA and SWA functions are closures, which do not pickle
        theirs, ours = run_pair(model, fn, use_buffers=True, updates=3)
        assert ours._plan is not None
        theirs = copy.deepcopy(theirs)
        if fn == "default":
            assert len(pickle.dumps(ours)) < 1.1 * len(pickle.dumps(theirs))  # no second copy of the model
        ours = how(ours)
        assert type(ours) is P.AveragedModel and ours._plan is None
        update_together(model, [theirs, ours], updates=3, seed=4)
        assert_same(theirs, ours)
    with pytest.raises(RuntimeError, match="pickled or deep-copied AveragedModel has none"):
        pyfused.optim.SGD(model.parameters(), lr=0.1, average=ours)


def test_step_average_first_update_is_a_copy():
    """The first update copies, as torch's: an inf or NaN average is replaced, and -0.0 stays -0.0
    (a lerp by 1 from -1 would give +0.0, from inf or NaN NaN)."""
    model = nn.Module()
    model.w = nn.Parameter(torch.tensor([-0.0, 1.0, 2.0]))
    ours = P.AveragedModel(model, multi_avg_fn=P.get_ema_multi_avg_fn(0.5))
    with torch.no_grad():
        ours.module.w.copy_(torch.tensor([-1.0, float("nan"), float("inf")]))
    opt = pyfused.optim.SGD(model.parameters(), lr=0.1, average=ours)
    model.w.grad = torch.zeros(3)
    opt.step()
    average = ours.module.w.detach()
    assert torch.equal(average, model.w.detach()) and torch.signbit(average[0])
