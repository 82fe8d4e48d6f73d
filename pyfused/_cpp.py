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
OPTIMIZERS = {"sgd": 0, "adagrad": 1, "rmsprop": 2, "adam": 3, "adadelta": 4}
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
REAL_DTYPES = {torch.complex64: torch.float32, torch.complex128: torch.float64}  # complex as its real view


HYPER_SIZES = {name: _C.hyper_size(code) for name, code in OPTIMIZERS.items()}


def _hypers(kernel: str, bucket, hypers) -> int:
    """The address of the bucket's hyperparameters (array('d'): each param group's Hyper in turn)."""
    if len(hypers) != len(bucket.group_ends) * HYPER_SIZES[kernel]:
        raise ValueError(f"expected {HYPER_SIZES[kernel]} hyperparameters per param group, got {len(hypers)} "
                         f"for {len(bucket.group_ends)} groups")
    return hypers.buffer_info()[0]


def optimizer_step(kernel: str, bucket, hypers, grad_factor, stats=None, average=None) -> None:
    """One call updates every tensor of the bucket, on torch.get_num_threads() threads. stats:
    None, or a [4, bucket.n] float64 tensor that receives each tensor's step statistics
    (pyfused/optim/stats.py). average: None, or (addresses, weight): each param's average
    (array('q'), the bucket's order) is lerped towards the new param by weight."""
    _C.optimizer_step(
        OPTIMIZERS[kernel],
        bucket.dtype_code,
        bucket.n,
        bucket.numels.buffer_info()[0],
        bucket.addresses.buffer_info()[0],
        bucket.steps.buffer_info()[0] if bucket.steps is not None else 0,
        bucket.steps_are_double,
        bucket.flags.buffer_info()[0] if bucket.flags is not None else 0,
        len(bucket.group_ends),
        bucket.group_ends.buffer_info()[0],
        _hypers(kernel, bucket, hypers),
        torch.get_num_threads(),
        grad_factor.divisor_value,
        grad_factor.multiplier_value,
        grad_factor.store_grads,
        0 if stats is None else stats.data_ptr(),
        0 if average is None else average[0].buffer_info()[0],
        0.0 if average is None else average[1],
    )


# Must match csrc/norm.h's NormKind.
NORM_MAX_ABS, NORM_MIN_ABS, NORM_SUM_ABS, NORM_SUM_SQUARES, NORM_SUM_POW = range(5)


def norm_powered_sum(dtype_code: int, numels, addresses, kind: int, p: float) -> float:
    """The p-th power of the global norm of the tensors at `addresses` (array('q')s), in double."""
    return _C.norm_powered_sum(
        dtype_code, len(numels), numels.buffer_info()[0], addresses.buffer_info()[0], kind, p,
        torch.get_num_threads(),
    )


def tensor_scalars(kernel: str, bucket, hypers, out: int) -> None:
    """Advances the bucket's steps and writes its per-tensor scalars (doubles) at address out."""
    _C.tensor_scalars(
        OPTIMIZERS[kernel],
        bucket.dtype_code,
        bucket.n,
        bucket.steps.buffer_info()[0] if bucket.steps is not None else 0,
        bucket.steps_are_double,
        bucket.flags.buffer_info()[0] if bucket.flags is not None else 0,
        len(bucket.group_ends),
        bucket.group_ends.buffer_info()[0],
        _hypers(kernel, bucket, hypers),
        out,
    )


def isa() -> str:
    """The instruction set the C++ kernels picked for this CPU."""
    return _C.isa()


# Batch normalization (csrc/batchnorm.h): a dense tensor as (outer, C, inner); per-channel values
# are float64 CPU tensors. pyfused/nn/batchnorm.py validates everything before these run. The
# last argument of the calls that write y or dx, True here, is fresh_out: that output was just
# allocated, and its pages may be huge ones (csrc/module.cpp, advise_huge_pages).

# Elements per thread below which another thread costs more than it saves: waking a pool worker
# takes tens of microseconds on a VM, about a pass over 256 Ki fp32 elements (at (256, 1024) two
# threads measured slower than one). The partitions are fixed, so no result depends on this.
BN_GRAIN = 1 << 18


def _bn_threads(shape) -> int:
    outer, channels, inner = shape
    return max(1, min(torch.get_num_threads(), outer * channels * inner // BN_GRAIN))


def bn_stats(x, shape) -> torch.Tensor:
    """[2, C]: each channel's mean and sum of squared deviations."""
    outer, channels, inner = shape
    out = torch.empty(2, channels, dtype=torch.float64)
    _C.bn_stats(DTYPE_CODES[x.dtype], outer, channels, inner, x.data_ptr(), out.data_ptr(),
                out[1].data_ptr(), _bn_threads(shape))
    return out


def _address(t):
    return 0 if t is None else t.data_ptr()


def bn_finalize(param_code, counts, stats, weight, bias, running_mean, running_var, momentum, eps):
    """[4, C]: save_mean, save_invstd, scale, shift, from `stats` ([G, 2, C], counts [G]); the
    running stats move when G > 0 and are used when G == 0 (eval)."""
    groups, _, channels = stats.shape
    out = torch.empty(4, channels, dtype=torch.float64)
    split = stats.transpose(0, 1).contiguous()  # [2, G, C]: the means, then the M2s
    _C.bn_finalize(param_code, channels, groups, _address(counts), split.data_ptr(),
                   split.data_ptr() + 8 * groups * channels, _address(weight), _address(bias),
                   _address(running_mean), _address(running_var), momentum, eps, out.data_ptr(),
                   out[1].data_ptr(), out[2].data_ptr(), out[3].data_ptr())
    return out


def bn_normalize(x, shape, scale, shift, relu) -> torch.Tensor:
    y = torch.empty_like(x)
    _C.bn_normalize(DTYPE_CODES[x.dtype], *shape, x.data_ptr(), y.data_ptr(), scale.data_ptr(),
                    shift.data_ptr(), relu, _bn_threads(shape), True)
    return y


def bn_grad_sums(dy, x, shape, mean, scale, shift, relu) -> torch.Tensor:
    """[2, C]: sum dy and sum dy * (x - mean), dy masked by the ReLU if relu."""
    out = torch.empty(2, shape[1], dtype=torch.float64)
    _C.bn_grad_sums(DTYPE_CODES[x.dtype], *shape, dy.data_ptr(), x.data_ptr(), mean.data_ptr(),
                    scale.data_ptr(), shift.data_ptr(), relu, out.data_ptr(), out[1].data_ptr(),
                    _bn_threads(shape))
    return out


def bn_backward_finalize(param_code, count, training, sums, mean, invstd, weight, bias, dweight, dbias):
    """Writes dweight and dbias (when given); returns the [6, C] grad_input coefficients."""
    channels = sums.shape[1]
    out = torch.empty(6, channels, dtype=torch.float64)
    _C.bn_backward_finalize(param_code, channels, float(count), training, sums.data_ptr(),
                            sums[1].data_ptr(), mean.data_ptr(), invstd.data_ptr(), _address(weight),
                            _address(bias), _address(dweight), _address(dbias), out.data_ptr())
    return out


def bn_grad_input(dy, x, shape, coefficients, relu, training) -> torch.Tensor:
    dx = torch.empty_like(x)
    _C.bn_grad_input(DTYPE_CODES[x.dtype], *shape, dy.data_ptr(), x.data_ptr(), dx.data_ptr(),
                     coefficients.data_ptr(), relu, training, _bn_threads(shape), True)
    return dx


def bn_forward(x, shape, param_code, weight, bias, running_mean, running_var, training, momentum, eps, relu):
    """One call: y, and the [4, C] saved values (mean, invstd, scale, shift); the running stats
    move in training."""
    y = torch.empty_like(x)
    saved = torch.empty(4, shape[1], dtype=torch.float64)
    _C.bn_forward(DTYPE_CODES[x.dtype], param_code, *shape, x.data_ptr(), y.data_ptr(), _address(weight),
                  _address(bias), _address(running_mean), _address(running_var), training, momentum, eps, relu,
                  saved.data_ptr(), _bn_threads(shape), True)
    return y, saved


def bn_backward(dy, x, shape, saved, param_code, weight, bias, need_x, need_w, need_b, training, relu):
    """One call: (dx, dweight, dbias), None for each grad not wanted."""
    dx = torch.empty_like(x) if need_x else None
    dweight = torch.empty_like(weight) if need_w else None
    dbias = torch.empty_like(bias) if need_b else None
    _C.bn_backward(DTYPE_CODES[x.dtype], param_code, *shape, dy.data_ptr(), x.data_ptr(), _address(dx),
                   saved.data_ptr(), _address(weight), _address(bias), _address(dweight), _address(dbias),
                   training, relu, _bn_threads(shape), True)
    return dx, dweight, dbias


# Must match csrc/kernels.h's DropoutOp.
DROPOUT_SCALE, DROPOUT_ADD_RESIDUAL = 0, 1


def dropout(op: int, dtype_code: int, numel: int, group: int, seed: int, p: float, scale: float,
            x: int, out: int, residual: int = 0, bias: int = 0, bias_numel: int = 0,
            fresh_out: bool = False) -> None:
    """Dropout of `numel` contiguous elements at address x into out (csrc/dropout.h); fresh_out:
    out was just allocated and nothing has touched it yet."""
    _C.dropout(op, dtype_code, numel, group, seed, p, scale, x, out, residual, bias, bias_numel,
               torch.get_num_threads(), fresh_out)


# Must match csrc/kernels.h's AverageOp.
AVERAGE_LERP, AVERAGE_DIVIDE = 0, 1


def average(op: int, dtype_code: int, numels, addresses, scalar: float) -> None:
    """Updates the averages at row 0 of `addresses` (array('q'), [2][n]) from the model's tensors
    at row 1 (csrc/averaging.h): a lerp by the weight `scalar`, or an add of the difference
    divided by `scalar`."""
    _C.average(op, dtype_code, len(numels), numels.buffer_info()[0], addresses.buffer_info()[0], scalar,
               torch.get_num_threads())
