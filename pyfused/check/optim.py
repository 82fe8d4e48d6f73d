"""The optimizers: the test suite's parity table (optim_cases.py), run by its own check_parity.

Each (case, dtype) of optim_cases.CASES x optim_cases.DTYPES runs pyfused on the backend and
torch's for-loop implementation side by side: three param groups with odd sizes, grads missing
on some steps, two state_dict swaps between torch and pyfused, params and every state tensor
compared at the dtype's tolerance (16-bit params against torch's fp32 math rounded once per
step). optim_cases.KNOWN_ISSUES rows are reported as XFAIL or SKIP with their reasons.

quick: every case in fp32 and the first case of each optimizer in every other dtype, as the
interpreter suite does, over 8 steps instead of 20 (both state_dict swaps still happen).
"""

import contextlib

from pyfused.check import Check
from pyfused.check import optim_cases as oc

INTERPRETER_SIZES = (0, 1, 7, 130)  # the interpreter runs ~1e6 elements/s


def checks(backend, device, quick):
    first_of_each = {next(c.id for c in oc.CASES if c.optimizer == name) for name in oc.OPTIMIZERS}
    sizes = INTERPRETER_SIZES if backend == "triton" and device.type == "cpu" else oc.DEFAULT_SIZES
    steps, swaps = (8, (3, 6)) if quick else (20, (7, 14))
    for dt in oc.DTYPES:
        for case in oc.CASES:
            if quick and dt.name != "fp32" and case.id not in first_of_each:
                continue
            yield Check(case.id, dt.name, _runner(case, dt, backend, device, sizes, steps, swaps),
                        oc.KNOWN_ISSUES.get((case.id, dt.name)))


def _runner(case, dt, backend, device, sizes, steps, swaps):
    def run(errors):
        with _measured(errors), _on(device):
            oc.check_parity(case, dt, sizes=sizes, backend=backend, steps=steps, swaps=swaps)

    return run


@contextlib.contextmanager
def _measured(errors):
    """Records every comparison check_parity makes (the tolerance it applies included) before
    check_parity's own assertion judges it."""
    judge = oc._assert_close

    def recording(actual, expected, tol, name):
        errors.record(actual, expected, tol.rtol, tol.atol)
        return judge(actual, expected, tol, name)

    oc._assert_close = recording
    try:
        yield
    finally:
        oc._assert_close = judge


@contextlib.contextmanager
def _on(device):
    """The table builds its params and grads on the CPU; other devices get copies of the same
    values, so both sides of the comparison run there (torch's for-loop on CUDA is the reference
    for the compiled Triton kernels)."""
    if device.type == "cpu":
        yield
        return
    initial, grad = oc.initial_value, oc.grad_value
    oc.initial_value = lambda spec: initial(spec).to(device)
    oc.grad_value = lambda spec, step: grad(spec, step).to(device)
    try:
        yield
    finally:
        oc.initial_value, oc.grad_value = initial, grad
