"""Batch norm: the test suite's table (batchnorm_cases.py) against torch's modules in float64.

Each case runs pyfused's module on the backend beside torch's BatchNorm (then ReLU) in float64,
both from the same rounded parameters, for several training steps on new batches (output, dx,
dweight, dbias, running_mean, running_var, num_batches_tracked after every step), then both in
eval. Errors are against batchnorm_cases.TOL[dtype] times the largest reference value of each
tensor (dx: times the size of the terms it is a difference of), so the table's rtol is 0 and its
atol is that bound.

train-eval <shape> bn|bn-relu: SHAPES in fp32, 3 training steps and 1 eval step.
<shape> <layout> bn|bn-relu, per DTYPE_PAIRS: LAYOUT_SHAPES, contiguous and channels_last, 2 + 1
    steps; dtype "bf16/fp32" is a bf16 input with fp32 parameters (as under autocast).
options <option>: OPTIONS (momentum=None, affine=False, ...) on OPTIONS_SHAPE, 3 + 2 steps.

The whole table takes about a second on the C++ backend, so quick runs all of it. Under the
Triton interpreter (every program runs in Python) only the shapes of at most INTERPRETER_NUMEL
elements run.
"""

import contextlib
import math

from pyfused.check import Check
from pyfused.check import batchnorm_cases as bc

INTERPRETER_NUMEL = 2000


def checks(backend, device, quick):
    interpreted = backend == "triton" and device.type == "cpu"

    def small(shape):
        return not interpreted or math.prod(shape) <= INTERPRETER_NUMEL

    for shape in filter(small, bc.SHAPES):
        for relu in (False, True):
            run = _runner(device, shape, "fp32", relu, False, 3, 1)
            yield Check(f"train-eval {_key(shape)} {_kind(relu)}", "fp32", run)
    for shape in filter(small, bc.LAYOUT_SHAPES):
        for dtypes in bc.DTYPE_PAIRS:
            for cl in (False, True):
                for relu in (False, True):
                    layout = "channels-last" if cl else "contiguous"
                    run = _runner(device, shape, dtypes, relu, cl, 2, 1)
                    yield Check(f"{_key(shape)} {layout} {_kind(relu)}", dtypes.replace("-fp32-params", "/fp32"), run)
    for options in bc.OPTIONS:
        yield Check(f"options {bc.options_id(options)}", "fp32",
                    _runner(device, bc.OPTIONS_SHAPE, "fp32", False, False, 3, 2, options))


def _key(shape):
    return "x".join(map(str, shape))


def _kind(relu):
    return "bn-relu" if relu else "bn"


def _runner(device, shape, dtypes, relu, cl, train_steps, eval_steps, options=None):
    dtype, param_dtype = bc.DTYPE_PAIRS[dtypes]

    def run(errors):
        ref, ours = bc.make(shape, dtype, param_dtype, relu, cl, device=device, **(options or {}))
        with _measured(errors):
            bc.run_and_compare(ref, ours, shape, dtype, relu, cl, steps=train_steps, device=device)
            ref.eval(), ours.eval()
            bc.run_and_compare(ref, ours, shape, dtype, relu, cl, steps=eval_steps, device=device)

    return run


@contextlib.contextmanager
def _measured(errors):
    """Records every comparison run_and_compare makes (its bound included) before bc.close judges it."""
    judge = bc.close

    def recording(actual, expected, tol, what, scale=1.0):
        errors.record(actual, expected, 0.0, bc.allowed(expected, tol, scale))
        return judge(actual, expected, tol, what, scale)

    bc.close = recording
    try:
        yield
    finally:
        bc.close = judge
