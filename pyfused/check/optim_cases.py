"""Shared tables and the parity check for pyfused's optimizers (modelled on PyTorch's
torch/testing/_internal/common_optimizers.py). Backend-neutral, so a Triton suite imports it:

    from pyfused.check.optim_cases import CASES, DTYPES_BY_NAME, check_parity
    for case in CASES:
        check_parity(case, DTYPES_BY_NAME["fp32"], sizes=(0, 1, 7, 130), backend="triton")

  CASES          one OptimCase per (optimizer, constructor configuration);
  DTYPES         each dtype with its tolerance, the reference it is compared against, and why;
  KNOWN_ISSUES   (case, dtype) pairs that are skipped or expected to fail, each with its reason;
  check_parity   pyfused on a named backend against torch's for-loop (or fused) implementation.
"""

import copy
import dataclasses

import torch

import pyfused

# ---------------------------------------------------------------------------------------------
# Optimizer configurations
# ---------------------------------------------------------------------------------------------

OPTIMIZERS = {  # name: (torch's class, pyfused's class)
    "SGD": (torch.optim.SGD, pyfused.optim.SGD),
    "Adagrad": (torch.optim.Adagrad, pyfused.optim.Adagrad),
    "RMSprop": (torch.optim.RMSprop, pyfused.optim.RMSprop),
    "Adam": (torch.optim.Adam, pyfused.optim.Adam),
    "AdamW": (torch.optim.AdamW, pyfused.optim.AdamW),
    "Adadelta": (torch.optim.Adadelta, pyfused.optim.Adadelta),
}

# The optimizers torch 2.13 has a CPU fused=True path for.
TORCH_FUSED_ON_CPU = ("SGD", "Adagrad", "Adam", "AdamW")


@dataclasses.dataclass(frozen=True)
class OptimCase:
    optimizer: str  # a key of OPTIMIZERS
    kwargs: dict  # constructor arguments: the defaults of every param group
    desc: str

    @property
    def id(self) -> str:
        return f"{self.optimizer}-{self.desc}"

    @property
    def torch_cls(self):
        return OPTIMIZERS[self.optimizer][0]

    @property
    def pyfused_cls(self):
        return OPTIMIZERS[self.optimizer][1]

    def make_kwargs(self) -> dict:
        """A fresh copy: two optimizers must not share a tensor lr or betas."""
        return {k: _fresh(v) for k, v in self.kwargs.items()}

    def group_options(self):
        """Per-group overrides of three param groups: the constructor's options; another lr,
        weight decay, maximize (and momentum, centered or amsgrad); twice the lr."""
        kw = self.kwargs
        lr = kw.get("lr", self.torch_cls([torch.zeros(1)]).defaults["lr"])
        second = {
            "lr": lr * 0.5,
            "weight_decay": 0.0 if kw.get("weight_decay", 0.0) else 0.01,
            "maximize": not kw.get("maximize", False),
        }
        if self.optimizer == "SGD" and kw.get("momentum", 0.0) and not kw.get("nesterov", False):
            second["momentum"] = 0.5
        if self.optimizer == "RMSprop":
            second["centered"] = not kw.get("centered", False)
        if self.optimizer in ("Adam", "AdamW"):
            second["amsgrad"] = not kw.get("amsgrad", False)
        return [{}, second, {"lr": lr * 2}]


def _fresh(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_fresh(v) for v in value)
    return copy.deepcopy(value)


def _case(optimizer, desc, **kwargs):
    return OptimCase(optimizer, kwargs, desc)


# The hyperparameters users set (lr 1e-3, betas (0.9, 0.999), weight decays 0.1 and 0.01) and the
# configurations of torch's own optimizer tests (torch/testing/_internal/common_optimizers.py),
# plus the options those leave out. Weight decays that are not powers of two make
# grad + weight_decay * param round, and cancel to ~0 in some elements of the 65,539-element param
# (DEFAULT_SIZES), where Adagrad's and RMSprop's 1/(sqrt(~0) + eps) magnify any difference in
# that rounding into whole units: only rounding exactly like torch's kernels passes.
CASES = [
    # SGD: lr, momentum, dampening, weight_decay, nesterov, maximize
    _case("SGD", "plain", lr=1e-3),
    _case("SGD", "lr", lr=1e-2),
    _case("SGD", "momentum", lr=1e-3, momentum=0.9),
    _case("SGD", "dampening", lr=1e-3, momentum=0.9, dampening=0.5),
    _case("SGD", "nesterov", lr=1e-3, momentum=0.9, nesterov=True, weight_decay=0.1),
    _case("SGD", "weight_decay", lr=1e-3, weight_decay=0.5),
    _case("SGD", "momentum_weight_decay", lr=1e-3, momentum=0.9, weight_decay=0.1),
    _case("SGD", "maximize", lr=1e-3, weight_decay=0.1, maximize=True),
    _case("SGD", "momentum_wd_maximize", lr=1e-3, momentum=0.9, dampening=0.1, weight_decay=0.01, maximize=True),
    _case("SGD", "nesterov_wd_maximize", lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True),
    _case("SGD", "tensor_lr", lr=torch.tensor(1e-3), momentum=0.9),
    # Adagrad: lr, lr_decay, weight_decay, initial_accumulator_value, eps, maximize
    _case("Adagrad", "plain"),
    _case("Adagrad", "lr", lr=0.1),
    _case("Adagrad", "weight_decay", weight_decay=0.1),
    _case("Adagrad", "maximize", weight_decay=0.1, maximize=True),
    _case("Adagrad", "initial_accumulator", initial_accumulator_value=0.1, weight_decay=0.1),
    _case("Adagrad", "lr_decay", lr=0.1, lr_decay=0.5, weight_decay=0.1),
    _case("Adagrad", "eps", eps=1e-3, weight_decay=0.01),
    _case("Adagrad", "all", lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1, eps=1e-5,
          maximize=True),
    _case("Adagrad", "tensor_lr", lr=torch.tensor(1e-3), lr_decay=0.01, weight_decay=0.1),
    # RMSprop: lr, alpha, eps, weight_decay, momentum, centered, maximize
    _case("RMSprop", "plain"),
    _case("RMSprop", "lr", lr=1e-3),
    _case("RMSprop", "alpha", lr=1e-3, alpha=0.9),
    _case("RMSprop", "eps", lr=1e-3, eps=1e-3),
    _case("RMSprop", "weight_decay", weight_decay=0.1),
    _case("RMSprop", "maximize", maximize=True),
    _case("RMSprop", "maximize_weight_decay", weight_decay=0.1, maximize=True),
    _case("RMSprop", "centered", weight_decay=0.1, centered=True),
    _case("RMSprop", "momentum", weight_decay=0.1, centered=True, momentum=0.1),
    _case("RMSprop", "momentum_not_centered", lr=1e-3, weight_decay=0.01, momentum=0.9),
    # alpha < 0.5: grad_avg's lerp takes its other formula
    _case("RMSprop", "centered_momentum_small_alpha", lr=1e-2, alpha=0.3, momentum=0.5, centered=True),
    _case("RMSprop", "all", lr=1e-3, alpha=0.95, eps=1e-6, weight_decay=0.1, momentum=0.1, centered=True,
          maximize=True),
    _case("RMSprop", "tensor_lr", lr=torch.tensor(1e-3), momentum=0.5, weight_decay=0.01),
    # Adam and AdamW: lr, betas, eps, weight_decay, amsgrad, maximize
    *[
        case
        for name in ("Adam", "AdamW")
        for case in (
            _case(name, "plain"),
            _case(name, "lr", lr=1e-2),
            _case(name, "betas", betas=(0.9, 0.99)),
            # beta1 < 0.5: exp_avg's lerp takes its other formula
            _case(name, "small_betas", betas=(0.3, 0.5), weight_decay=0.01),
            _case(name, "eps", eps=1e-4),
            _case(name, "weight_decay", weight_decay=0.1),
            _case(name, "maximize", weight_decay=0.1, maximize=True),
            _case(name, "amsgrad", weight_decay=0.1, amsgrad=True),
            _case(name, "amsgrad_wd_maximize", lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                  amsgrad=True, maximize=True),
            _case(name, "tensor_lr", lr=torch.tensor(0.01), weight_decay=0.1),
            _case(name, "tensor_betas", lr=torch.tensor(1e-3), betas=(torch.tensor(0.9), torch.tensor(0.99))),
        )
    ],
    _case("Adam", "decoupled_weight_decay", weight_decay=0.1, decoupled_weight_decay=True),
    # Adadelta: lr, rho, eps, weight_decay, maximize
    _case("Adadelta", "plain"),
    _case("Adadelta", "lr", lr=0.1),
    _case("Adadelta", "rho", rho=0.5, weight_decay=0.01),
    _case("Adadelta", "eps", eps=1e-3),
    _case("Adadelta", "weight_decay", weight_decay=0.1),
    _case("Adadelta", "maximize", weight_decay=0.1, maximize=True),
    _case("Adadelta", "all", lr=0.5, rho=0.95, eps=1e-5, weight_decay=0.01, maximize=True),
    _case("Adadelta", "tensor_lr", lr=torch.tensor(0.1), weight_decay=0.1),
]
CASES_BY_ID = {c.id: c for c in CASES}
assert len(CASES_BY_ID) == len(CASES), "case ids must be unique"


def cases_of(*optimizers):
    return [c for c in CASES if c.optimizer in optimizers]


# ---------------------------------------------------------------------------------------------
# Dtypes, references and tolerances
# ---------------------------------------------------------------------------------------------

# torch.testing's default (rtol, atol) per dtype: torch's own test_fused_matches_forloop
# (test/test_optim.py: _test_derived_optimizers -> _compare_between, 7 steps) compares fused
# with for-loop at these. No tolerance here may be looser.
TORCH_DEFAULT_TOLERANCES = {
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    torch.float32: (1.3e-6, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.complex64: (1.3e-6, 1e-5),
    torch.complex128: (1e-7, 1e-7),
}
SIXTEEN_BIT = (torch.bfloat16, torch.float16)

# References:
#   "forloop"          torch's for-loop (foreach=False) in the params' dtype; pyfused and it run
#                      free for the whole run, compared mid-run and at the end.
#   "forloop_fp32"     torch's for-loop in fp32 on the upcast 16-bit params, state and grads,
#                      with params and state rounded to the 16-bit dtype after every step (the
#                      math pyfused and torch's fused kernels do; torch's 16-bit for-loop rounds
#                      after every op instead). Each step starts from pyfused's values and is
#                      compared on its own, so one flipped rounding is not carried and amplified.
#   "fused"            torch's fused=True path in the params' dtype.


@dataclasses.dataclass(frozen=True)
class DtypeTol:
    name: str
    dtype: torch.dtype
    rtol: float
    atol: float
    reference: str
    reason: str
    # Largest fraction of a tensor's elements that may differ at all from the reference (only
    # checked in tensors of 100+ elements): catches a wrong rounding mode, which stays within
    # one ulp but changes about half of the elements.
    max_mismatch: float = 1.0

    def __post_init__(self):
        rtol, atol = TORCH_DEFAULT_TOLERANCES[self.dtype]
        assert self.rtol <= rtol and self.atol <= atol, f"{self.name}: looser than torch's own tests"


# pyfused rounds like torch's CPU kernels (one fma exactly where they fuse, each other op rounded),
# except sqrt: torch's CPU sqrt is 1 ulp off for ~0.6% of fp32 and fp64 values, pyfused's is
# correctly rounded. That ulp, carried over 20 steps, is what the tolerances below absorb.
_SQRT_ULP = "torch's CPU sqrt is 1 ulp off in ~0.6% of elements, pyfused's correctly rounded"
DTYPES = [
    DtypeTol("fp32", torch.float32, 1.3e-6, 1e-5, "forloop",
             f"torch's own fp32 tolerance: {_SQRT_ULP}, a few ulps after 20 steps"),
    DtypeTol("fp64", torch.float64, 1e-12, 1e-12, "forloop",
             f"{_SQRT_ULP} (fp64 too): measured <= 1e-14, far tighter than torch's 1e-7"),
    DtypeTol("bf16", torch.bfloat16, 1.6e-2, 1e-5, "forloop_fp32",
             "an fp32 sqrt ulp can flip one bf16 rounding: <= 1 bf16 ulp (2**-8 relative)", max_mismatch=0.02),
    DtypeTol("fp16", torch.float16, 1e-3, 1e-5, "forloop_fp32",
             "an fp32 sqrt ulp can flip one fp16 rounding: <= 1 fp16 ulp (< 2**-10 relative)", max_mismatch=0.02),
    DtypeTol("complex64", torch.complex64, 1.3e-6, 1e-5, "forloop",
             "torch and pyfused update the real view; fp32's sqrt ulps"),
    DtypeTol("complex128", torch.complex128, 1e-12, 1e-12, "forloop",
             "torch and pyfused update the real view; fp64's sqrt ulps"),
]
DTYPES_BY_NAME = {d.name: d for d in DTYPES}
DTYPES_BY_DTYPE = {d.dtype: d for d in DTYPES}

# pyfused fp32 against torch's fused=True CPU kernels (one vectorized expression per element in
# their own order of operations): torch's own fused-vs-forloop fp32 tolerance.
TORCH_FUSED_FP32 = DtypeTol("fp32", torch.float32, 1.3e-6, 1e-5, "fused",
                            "torch's fused kernels have their own op order: fp32 ulps")

_TENSOR_HYPER_FP64 = (
    "pyfused computes lr/bias-correction scalars in double; torch's for-loop computes them as fp32 "
    "tensors when lr or betas is an fp32 tensor (1 - lr*wd, lr/bc1, beta**step), which moves fp64 "
    "params by ~1e-7 relative"
)
_SQRT_ULP_AT_A_CANCELLATION = (
    "one element of 131,078 (measured: 4.6e-5 off at step 7): an element 1 ulp apart from torch's "
    "(pyfused's correctly rounded sqrt, torch's 1 ulp off) meets grad + 0.1 * param ~ 0 at lr=1e-2, "
    "where RMSprop's 1/(sqrt(square_avg) + eps) magnifies that ulp; fp32, with half the elements, passes"
)
# (case id, dtype name): ("xfail" | "skip", reason)
KNOWN_ISSUES = {
    **{(cid, "fp64"): ("xfail", _TENSOR_HYPER_FP64) for cid in (
        "Adagrad-tensor_lr", "Adam-tensor_lr", "AdamW-tensor_lr", "Adam-tensor_betas", "AdamW-tensor_betas")},
    **{(cid, "complex128"): ("xfail", _TENSOR_HYPER_FP64) for cid in (
        "Adagrad-tensor_lr", "Adam-tensor_lr", "AdamW-tensor_lr", "Adam-tensor_betas", "AdamW-tensor_betas")},
    ("RMSprop-maximize_weight_decay", "complex64"): ("xfail", _SQRT_ULP_AT_A_CANCELLATION),
}


def parity_params(cases=None, dtypes=None):
    """pytest.params of (case, DtypeTol), with KNOWN_ISSUES as marks (xfails are strict)."""
    import pytest

    out = []
    for dt in DTYPES if dtypes is None else dtypes:
        for case in CASES if cases is None else cases:
            kind, reason = KNOWN_ISSUES.get((case.id, dt.name), (None, None))
            marks = ()
            if kind == "xfail":
                marks = pytest.mark.xfail(reason=reason, strict=True, raises=AssertionError)
            elif kind == "skip":
                marks = pytest.mark.skip(reason=reason)
            out.append(pytest.param(case, dt, id=f"{case.id}-{dt.name}", marks=marks))
    return out


# ---------------------------------------------------------------------------------------------
# The parity run
# ---------------------------------------------------------------------------------------------

# 65,539 (64Ki + 3): large enough that grad + weight_decay * param cancels in some elements, and
# not a multiple of any vector width, so every run has vector bodies and scalar tails.
DEFAULT_SIZES = (0, 1, 7, 4097, 65_539)
# 16-bit params: their fp32 reference re-runs every step from pyfused's values (start_from), which
# at 65,539 elements costs the suite about a minute; they round the same fp32 opmath values that
# the fp32 table checks at 65,539 elements, so 4097 is enough here.
SIXTEEN_BIT_SIZES = (0, 1, 7, 4097)
LARGE_SIZE = 1_000_003


def _shape(numel):
    """Some params are 2-D and one is 0-d, as in a model."""
    return {0: (0,), 1: (), 7: (7,), 4097: (17, 241)}.get(numel, (numel,))


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    group: int
    shape: tuple
    dtype: torch.dtype
    no_grad_steps: frozenset  # the steps on which this param's grad is None
    seed: int


def layout(sizes, dtypes, steps, late_first_grad=True):
    """Three param groups (see OptimCase.group_options), each ending with a zero-size param.

    Group 0: one param per size (dtypes cycled over all params); its first param gets no grad on
    the first two steps (its state is created late; `late_first_grad`) and its second none on
    steps 4, 5 and 13.
    Group 1: a size-7 param that never gets a grad (no state, no step), a size-5 param with no
    grad on step 3, and a (2, 0) param. Group 2: a size-33 param and a (0,) param.
    """
    dtypes = list(dtypes)
    none = {0: {0, 1} if late_first_grad else (), 1: {4, 5, 13}}
    rows = [(0, _shape(n), none.get(i, ())) for i, n in enumerate(sizes)]
    rows += [(0, (0,), ()), (1, (7,), range(steps)), (1, (5,), {3}), (1, (2, 0), ()), (2, (33,), ()), (2, (0,), ())]
    return [
        ParamSpec(group, shape, dtypes[i % len(dtypes)], frozenset(s for s in none if s < steps), 100 + i)
        for i, (group, shape, none) in enumerate(rows)
    ]


def _randn(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32
    if dtype.is_complex:
        return torch.view_as_complex(torch.randn((*shape, 2), generator=g, dtype=base)).to(dtype)
    return torch.randn(shape, generator=g, dtype=base).to(dtype)


def initial_value(spec):
    return _randn(spec.shape, spec.dtype, spec.seed)


def grad_value(spec, step):
    """Grads do not depend on the params, so differences are not fed back through a loss;
    every 11th element (from the 6th) is exactly zero: the sqrt(0) + eps paths."""
    g = _randn(spec.shape, spec.dtype, spec.seed * 1000 + step) * 0.5
    g.view(-1)[5::11] = 0
    return g


class Run:
    """One optimizer (pyfused's or torch's) over fresh params laid out by `specs`."""

    def __init__(self, specs, make_optimizer, upcast=False):
        self.specs = specs
        self.upcast = upcast  # "forloop_fp32" reference: 16-bit params held in fp32
        self.params = []
        for spec in specs:
            value = initial_value(spec)
            if upcast and spec.dtype in SIXTEEN_BIT:
                value = value.float()
            self.params.append(torch.nn.Parameter(value))
        self.initial = [p.detach().clone() for p in self.params]
        self.make_optimizer = make_optimizer
        self.optimizer = make_optimizer(self.param_groups())
        self.round_to_storage()  # state made at construction (Adagrad's sum)

    def param_groups(self):
        groups = {}
        for spec, p in zip(self.specs, self.params):
            groups.setdefault(spec.group, []).append(p)
        return [groups[i] for i in sorted(groups)]

    def set_grads(self, step):
        for spec, p in zip(self.specs, self.params):
            p.grad = None if step in spec.no_grad_steps else grad_value(spec, step).to(p.dtype)

    def round_to_storage(self):
        """The reference's 16-bit storage: round params and state to the param's dtype."""
        if not self.upcast:
            return
        with torch.no_grad():
            for spec, p in zip(self.specs, self.params):
                if spec.dtype not in SIXTEEN_BIT:
                    continue
                p.copy_(p.to(spec.dtype))
                for key, t in self.optimizer.state.get(p, {}).items():
                    if key != "step" and isinstance(t, torch.Tensor):
                        t.copy_(t.to(spec.dtype))

    def step(self, step, backend=None):
        self.set_grads(step)
        if backend is None:
            self.optimizer.step()
        else:
            with pyfused.use_backend(backend):
                self.optimizer.step()
        self.round_to_storage()

    def start_from(self, other):
        """Reference only: take `other`'s 16-bit params and state (upcast) as this step's start."""
        with torch.no_grad():
            for spec, p, q in zip(self.specs, self.params, other.params):
                if spec.dtype not in SIXTEEN_BIT:
                    continue
                p.copy_(q)
                theirs = other.optimizer.state.get(q, {})
                for key, t in self.optimizer.state.get(p, {}).items():
                    if key != "step" and isinstance(t, torch.Tensor) and isinstance(theirs.get(key), torch.Tensor):
                        t.copy_(theirs[key])

    def load(self, state_dict, fresh):
        """Continue from `state_dict`: with a new optimizer over the same params, or the same one."""
        if fresh:
            self.optimizer = self.make_optimizer(self.param_groups())
        self.optimizer.load_state_dict(copy.deepcopy(state_dict))  # a checkpoint shares nothing
        self.round_to_storage()


def _tol(dtype, tolerances):
    return (tolerances or {}).get(dtype) or DTYPES_BY_DTYPE[dtype]


def _close(a, b, rtol, atol):
    """torch.testing.assert_close's criterion (equal_nan=True), without its cost on 1e6 elements."""
    ok = (a - b).abs_() <= b.abs().mul_(rtol).add_(atol)
    if bool(ok.all()):
        return True
    ok |= (a == b) | (a.isnan() & b.isnan())
    return bool(ok.all())


def _assert_close(actual, expected, tol, name):
    if actual.is_complex():
        actual, expected = torch.view_as_real(actual), torch.view_as_real(expected)
    actual = actual.to(expected.dtype)
    if not _close(actual, expected, tol.rtol, tol.atol):
        torch.testing.assert_close(actual, expected, rtol=tol.rtol, atol=tol.atol, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")
        raise AssertionError(f"{name}: not within rtol={tol.rtol}, atol={tol.atol}")
    if tol.max_mismatch < 1 and actual.numel() >= 100:
        differ = (actual != expected) & ~(actual.isnan() & expected.isnan())
        fraction = differ.sum().item() / differ.numel()
        assert fraction <= tol.max_mismatch, (
            f"{name}: {fraction:.1%} of the elements differ from the reference "
            f"(at most {tol.max_mismatch:.0%} may, by one flipped rounding)"
        )


def compare_runs(actual, expected, tolerances=None, where=""):
    """Params, every state tensor, the set of state keys and `step`, param by param."""
    for i, (spec, p, q) in enumerate(zip(actual.specs, actual.params, expected.params)):
        tol = _tol(spec.dtype, tolerances)
        name = f"{where}param {i} (group {spec.group}, {tuple(spec.shape)}, {spec.dtype})"
        assert p.dtype == spec.dtype, f"{name}: dtype changed to {p.dtype}"
        _assert_close(p.detach(), q.detach(), tol, name)
        s = actual.optimizer.state.get(p, {})
        t = expected.optimizer.state.get(q, {})
        assert set(s) == set(t), f"{name}: state keys {sorted(s)} != torch's {sorted(t)}"
        for key, b in t.items():
            a = s[key]
            if key == "step":
                assert isinstance(a, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape), (
                    f"{name}: step {a!r} is not represented as torch's {b!r}"
                )
                assert a.item() == b.item(), f"{name}: step {a.item()} != torch's {b.item()}"
            elif b is None:
                assert a is None, f"{name}: state {key!r} is {a!r}; torch's is None"
            else:
                assert (a.dtype, a.shape) == (spec.dtype, p.shape), f"{name}: state {key!r} is {a.dtype} {tuple(a.shape)}"
                _assert_close(a, b, tol, f"{name}: state {key!r}")


def assert_moved(run, steps):
    """Guards against a parity check that cannot fail: every param with a grad and elements
    changed (pyfused could otherwise match a reference that also did nothing). A 16-bit param
    whose every update is below half an ulp stays put, in torch too (lr=1e-3 in bf16): of those,
    the run's largest must have moved."""
    still = []
    for i, (spec, p, p0) in enumerate(zip(run.specs, run.params, run.initial)):
        if p.numel() == 0 or len(spec.no_grad_steps) == steps or not torch.equal(p.detach(), p0):
            continue
        still.append((spec, i))
        assert spec.dtype in SIXTEEN_BIT, f"param {i} {tuple(spec.shape)} never moved"
    moving = [(p.numel(), i) for i, (spec, p) in enumerate(zip(run.specs, run.params))
              if spec.dtype in SIXTEEN_BIT and len(spec.no_grad_steps) < steps and p.numel()]
    if moving:
        n, largest = max(moving)
        assert (run.specs[largest], largest) not in still, f"param {largest} ({n} elements) never moved"


def make_factory(cls, case, extra=None):
    """A function that builds `cls` over a list of param lists with `case`'s group options."""

    def make(param_lists):
        options = case.group_options()
        groups = [dict(params=ps, **{k: _fresh(v) for k, v in options[i].items()}) for i, ps in enumerate(param_lists)]
        return cls(groups, **{**case.make_kwargs(), **(extra or {})})

    return make


def check_parity(case, dtypes, sizes=DEFAULT_SIZES, *, backend="cpp", steps=20, swaps=(7, 14),
                 reference="forloop", tolerances=None, ref_kwargs=None):
    """Runs `case` with pyfused (forced onto `backend`) and with torch for `steps` steps, and
    asserts that params and every state tensor agree. Returns (pyfused's run, torch's run).

    dtypes:     a DtypeTol, or a sequence of torch dtypes cycled over the params (mixed dtypes
                in one group; each compared at its DTYPES tolerance).
    reference:  "forloop" (torch's foreach=False; 16-bit params by the fp32 reference described
                above) or "fused" (torch's fused=True, in the params' own dtype).
    swaps:      at the first, each run goes on with a new optimizer that loads the other's
                state_dict (torch -> pyfused and pyfused -> torch); at the second, each existing
                optimizer loads the other's.
    ref_kwargs: overrides for the reference's constructor (a negative test's wrong option).
    """
    if isinstance(dtypes, DtypeTol):
        tolerances = {dtypes.dtype: dtypes, **(tolerances or {})}
        dtypes = (dtypes.dtype,)
    # torch's fused SGD fails ("expected Tensor ... got NoneType") when a param's first grad
    # comes after the others' momentum buffers exist; that case is left to the for-loop reference.
    specs = layout(sizes, dtypes, steps, late_first_grad=reference != "fused")
    upcast = reference == "forloop" and any(d in SIXTEEN_BIT for d in dtypes)
    ref_extra = {"fused": True} if reference == "fused" else {"foreach": False}
    ref_extra.update(ref_kwargs or {})
    ours = Run(specs, make_factory(case.pyfused_cls, case))
    ref = Run(specs, make_factory(case.torch_cls, case, ref_extra), upcast=upcast)
    for step in range(steps):
        if step in swaps:
            compare_runs(ours, ref, tolerances, where=f"before the state_dict swap at step {step}: ")
            ours_state, ref_state = ours.optimizer.state_dict(), ref.optimizer.state_dict()
            fresh = step == swaps[0]
            ours.load(ref_state, fresh)  # torch -> pyfused
            ref.load(ours_state, fresh)  # pyfused -> torch
        if upcast:
            ref.start_from(ours)
        ours.step(step, backend)
        ref.step(step)
        if upcast:
            compare_runs(ours, ref, tolerances, where=f"after step {step}: ")
    compare_runs(ours, ref, tolerances, where=f"after {steps} steps: ")
    assert_moved(ours, steps)
    return ours, ref


def run_pyfused(case, dtypes, sizes, steps=20, backend=None):
    """pyfused alone (determinism tests): the Run after `steps` steps."""
    run = Run(layout(sizes, dtypes, steps), make_factory(case.pyfused_cls, case))
    for step in range(steps):
        run.step(step, backend)
    return run


def snapshot(run):
    """Params and state of a run, as {name: tensor} copies (for bitwise comparisons)."""
    out = {}
    for i, p in enumerate(run.params):
        out[f"param{i}"] = p.detach().clone()
        for key, t in run.optimizer.state.get(p, {}).items():
            out[f"param{i}.{key}"] = t.clone() if isinstance(t, torch.Tensor) else t
    return out


def bitwise_share(case, dtype=torch.float32, numel=65_539, steps=20, backend=None):
    """The fraction of one param's elements that are bit-identical between pyfused (on `backend`)
    and torch's for-loop after `steps` steps of `case` (its constructor options, one group), with
    the same grads. Returns (fraction, number of elements)."""
    spec = ParamSpec(0, (numel,), dtype, frozenset(), seed=5)
    params = {}
    for impl, cls, extra in (("pyfused", case.pyfused_cls, {}), ("torch", case.torch_cls, {"foreach": False})):
        p = torch.nn.Parameter(initial_value(spec))
        optimizer = cls([p], **case.make_kwargs(), **extra)
        for step in range(steps):
            p.grad = grad_value(spec, step)
            if impl == "pyfused" and backend is not None:
                with pyfused.use_backend(backend):
                    optimizer.step()
            else:
                optimizer.step()
        params[impl] = p.detach()
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]
    same = params["pyfused"].view(bits) == params["torch"].view(bits)
    return same.double().mean().item(), numel
