"""The CPU backend: hands a bucket's address table to pyfused._C."""

import torch

try:
    from pyfused import _C
except ImportError as error:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "pyfused's C++ extension (pyfused._C) is not built or does not load: "
        f"{error}. Build it from the repository root with `pip install -e .` "
        "(needs a C++17 compiler and the Python headers)."
    ) from error

_C.isa()  # a bad PYFUSED_CPU_ISA is refused at import, not at the first step

# Must match csrc/kernels.h.
OPTIMIZERS = {"sgd": 0, "adagrad": 1, "rmsprop": 2, "adam": 3}
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
REAL_DTYPES = {torch.complex64: torch.float32, torch.complex128: torch.float64}  # complex as its real view


def optimizer_step(kernel: str, bucket, hyper: tuple, grad_factor) -> None:
    """One call updates every tensor of the bucket, on torch.get_num_threads() threads."""
    _C.optimizer_step(
        OPTIMIZERS[kernel],
        bucket.dtype_code,
        bucket.n,
        bucket.numels.buffer_info()[0],
        bucket.addresses.buffer_info()[0],
        bucket.steps.buffer_info()[0] if bucket.steps is not None else 0,
        bucket.steps_are_double,
        bucket.flags.buffer_info()[0] if bucket.flags is not None else 0,
        hyper,
        torch.get_num_threads(),
        grad_factor.divisor_value,
        grad_factor.multiplier_value,
        grad_factor.store_grads,
    )


# Must match csrc/norm.h's NormKind.
NORM_MAX_ABS, NORM_MIN_ABS, NORM_SUM_ABS, NORM_SUM_SQUARES, NORM_SUM_POW = range(5)


def norm_powered_sum(dtype_code: int, numels, addresses, kind: int, p: float) -> float:
    """The p-th power of the global norm of the tensors at `addresses` (array('q')s), in double."""
    return _C.norm_powered_sum(
        dtype_code, len(numels), numels.buffer_info()[0], addresses.buffer_info()[0], kind, p,
        torch.get_num_threads(),
    )


def tensor_scalars(kernel: str, bucket, hyper: tuple, out: int) -> None:
    """Advances the bucket's steps and writes its per-tensor scalars (doubles) at address out."""
    _C.tensor_scalars(
        OPTIMIZERS[kernel],
        bucket.dtype_code,
        bucket.n,
        bucket.steps.buffer_info()[0] if bucket.steps is not None else 0,
        bucket.steps_are_double,
        bucket.flags.buffer_info()[0] if bucket.flags is not None else 0,
        hyper,
        out,
    )


def isa() -> str:
    """The instruction set the C++ kernels picked for this CPU."""
    return _C.isa()


# Must match csrc/kernels.h's DropoutOp.
DROPOUT_SCALE, DROPOUT_ADD_RESIDUAL = 0, 1


def dropout(op: int, dtype_code: int, numel: int, group: int, seed: int, p: float, scale: float,
            x: int, out: int, residual: int = 0, bias: int = 0, bias_numel: int = 0) -> None:
    """Dropout of `numel` contiguous elements at address x into out (csrc/dropout.h)."""
    _C.dropout(op, dtype_code, numel, group, seed, p, scale, x, out, residual, bias, bias_numel,
               torch.get_num_threads())
