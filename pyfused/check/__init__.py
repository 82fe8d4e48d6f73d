"""pyfused's parity checker: every op family, on every backend this machine has, against torch.

Run it as ``pyfused-check`` or ``python -m pyfused.check`` (``--help`` for the options). It
prints one row per case: the largest absolute and relative error against torch's reference, the
tolerance, and PASS or FAIL; it exits non-zero if any case is out of tolerance.

The cases and tolerances are the test suite's own: each family's tables live in this package
(optim_cases.py, clip_cases.py, dropout_cases.py, batchnorm_cases.py) and tests/ imports them
from here, so the checker and the tests cannot drift apart.

A family is one small module here, registered by one line in FAMILIES. It defines

    def checks(backend: str, device: torch.device, quick: bool) -> Iterable[Check]

each Check naming a case and a dtype, with a function that runs it: it compares pyfused's results
with torch's through ``errors.record(actual, expected, rtol, atol)`` (which keeps the largest
errors for the table) and raises AssertionError when the test suite's criterion fails. ``quick``
asks for a subset that keeps the whole quick run under a minute on 2 cores. optim.py, clip.py,
dropout.py and batchnorm.py are the four families.

Statuses: PASS; FAIL (out of tolerance); ERROR (raised anything else); XFAIL / SKIP (a known,
documented difference from the suite's KNOWN_ISSUES, with its reason; XPASS if it has gone).
Only FAIL and ERROR make the exit status non-zero.

_perturbed(eps) (PYFUSED_CHECK_PERTURB=eps on the command line) is the test-only hook that makes
the kernels wrong on purpose, so that a test can see the checker fail.
"""

import array
import contextlib
import dataclasses
import importlib
import importlib.util
import math
import os
import time
from typing import Callable, Optional

import torch

# name: module. The order is the report's.
FAMILIES = {
    "optim": "pyfused.check.optim",
    "clip": "pyfused.check.clip",
    "dropout": "pyfused.check.dropout",
    "batchnorm": "pyfused.check.batchnorm",
}

PASSING = ("PASS", "XFAIL", "XPASS", "SKIP")  # XFAIL / XPASS: a known, documented difference


class Errors:
    """The largest errors seen over a case's comparisons, and the tolerance of the worst one."""

    def __init__(self):
        self.max_abs = 0.0
        self.max_rel = 0.0
        self.worst = 0.0  # max over elements of |actual - expected| / (atol + rtol |expected|)
        self.rtol = self.atol = None

    def record(self, actual, expected, rtol, atol):
        # One thread: these elementwise passes are small, and torch's 2-thread OpenMP ops stall
        # for tens of ms each on a loaded machine (measured: 77 ms against 1.9 ms at 65Ki values).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self._record(actual, expected, rtol, atol)
        finally:
            torch.set_num_threads(threads)

    def _record(self, actual, expected, rtol, atol):
        a, e = _as_float64(actual), _as_float64(expected)  # each as stored: float64 holds both exactly
        if a.numel() == 0:
            if self.rtol is None:
                self.rtol, self.atol = rtol, atol
            return
        same = (a == e) | (a.isnan() & e.isnan())  # inf == inf and NaN where torch has NaN agree
        diff = torch.where(same, 0.0, (a - e).abs().nan_to_num(nan=math.inf, posinf=math.inf))
        # max rel: over the elements where torch's value is nonzero (a zero's is in max abs and err/tol)
        rel = torch.where((diff == 0) | (e == 0), 0.0, (diff / e.abs()).nan_to_num(nan=math.inf, posinf=math.inf))
        ratio = torch.where(diff == 0, 0.0, (diff / (atol + rtol * e.abs())).nan_to_num(nan=math.inf, posinf=math.inf))
        worst = float(ratio.max())
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.max_rel = max(self.max_rel, float(rel.max()))
        if worst >= self.worst or self.rtol is None:
            self.worst, self.rtol, self.atol = max(worst, self.worst), rtol, atol


def _as_float64(t):
    t = t.detach()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.to("cpu", torch.float64).flatten()


@dataclasses.dataclass
class Check:
    case: str
    dtype: str
    run: Callable[[Errors], None]
    known: Optional[tuple] = None  # ("xfail" | "skip", reason), from the suite's KNOWN_ISSUES


@dataclasses.dataclass
class Result:
    family: str
    backend: str
    case: str
    dtype: str
    status: str  # PASS, FAIL, ERROR (raised something else), XFAIL, XPASS, SKIP
    max_abs: Optional[float]
    max_rel: Optional[float]
    rtol: Optional[float]
    atol: Optional[float]
    err_over_tol: Optional[float]
    seconds: float
    note: str = ""


def available_backends():
    """cpp always; triton with triton installed and a CUDA GPU, or under TRITON_INTERPRET=1 (set
    before start) on CPU tensors."""
    backends = ["cpp"]
    if importlib.util.find_spec("triton") is not None and (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    ):
        backends.append("triton")
    return backends


def device_for(backend):
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        return torch.device("cuda")
    return torch.device("cpu")


def run_check(family, backend, check):
    import pyfused

    errors = Errors()
    kind, reason = check.known or (None, "")
    start = time.perf_counter()
    status, note = "PASS", ""
    if kind == "skip":
        status, note = "SKIP", reason
    else:
        try:
            with pyfused.use_backend(backend):
                check.run(errors)
        except AssertionError as error:
            status, note = "FAIL", _first_line(error)
        except Exception as error:  # a crash is a failure too, reported as what it is
            status, note = "ERROR", f"{type(error).__name__}: {_first_line(error)}"
        if kind == "xfail":
            status, note = ("XFAIL" if status == "FAIL" else "XPASS" if status == "PASS" else status), reason
    measured = errors.rtol is not None
    return Result(
        family, backend, check.case, check.dtype, status,
        errors.max_abs if measured else None, errors.max_rel if measured else None,
        errors.rtol, errors.atol, errors.worst if measured else None,
        time.perf_counter() - start, note,
    )


def _first_line(error):
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def family_checks(name, backend, quick):
    module = importlib.import_module(FAMILIES[name])
    return module.checks(backend, device_for(backend), quick)


@contextlib.contextmanager
def _perturbed(eps):
    """Test-only: makes pyfused's kernels wrong by a relative `eps`, to show that the checker
    catches a wrong kernel. Each optimizer kernel runs with its lr scaled by (1 + eps) (every
    optimizer's first scalar is lr; the update and decoupled weight decay move with it); each
    global norm's powered sum, and each batch norm's per-channel mean and sum of squared
    deviations (hence its output, grads and running stats), are scaled by (1 + eps); so are the
    outputs of the CPU's one-call batch norm (y and its saved statistics, then dx, dweight and
    dbias), whose statistics never come back to Python; dropout
    multiplies its kept elements by scale * (1 + eps). ``python -m pyfused.check`` applies it when
    PYFUSED_CHECK_PERTURB=<eps> is set."""
    from pyfused import _cpp, _triton  # _triton imports triton only when a kernel launches

    def scaled_lr(step):
        def wrapped(kernel, bucket, hypers, *args):
            # hypers: each param group's Hyper in turn (array('d')), lr first in each
            scaled = array.array("d", hypers)
            for i in range(0, len(scaled), _cpp.HYPER_SIZES[kernel]):
                scaled[i] *= 1 + eps
            return step(kernel, bucket, scaled, *args)

        return wrapped

    def scaled_result(norm):
        def wrapped(*args):
            return norm(*args) * (1 + eps)

        return wrapped

    def scaled_outputs(kernel):
        def wrapped(*args):
            outputs = kernel(*args)
            for t in outputs:
                if t is not None:
                    t.mul_(1 + eps)
            return outputs

        return wrapped

    def scaled_dropout(dropout):
        def wrapped(op, dtype_code, numel, group, seed, p, scale, *args):  # both backends' order
            return dropout(op, dtype_code, numel, group, seed, p, scale * (1 + eps), *args)

        return wrapped

    patches = [
        (_cpp, "optimizer_step", scaled_lr), (_triton, "optimizer_step", scaled_lr),
        (_cpp, "norm_powered_sum", scaled_result), (_triton, "norm_powered_sum", scaled_result),
        (_cpp, "bn_stats", scaled_result), (_triton, "bn_stats", scaled_result),
        (_cpp, "bn_forward", scaled_outputs), (_cpp, "bn_backward", scaled_outputs),
        (_cpp, "dropout", scaled_dropout), (_triton, "dropout", scaled_dropout),
    ]
    saved = [(module, name, getattr(module, name)) for module, name, _ in patches]
    try:
        for module, name, wrap in patches:
            setattr(module, name, wrap(getattr(module, name)))
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
