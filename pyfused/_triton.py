"""The CUDA backend: one launch of kernels/multi_tensor.py's driver per bucket and step.

Imported on the first step that needs it, so `import pyfused` never imports triton. The same
code runs CPU tensors under the Triton interpreter (TRITON_INTERPRET=1), which is how CI tests it.
"""

import array
import functools
import operator
import os

import torch

from pyfused import _cpp

_OPTIMIZERS = {"sgd": 0, "adagrad": 1, "rmsprop": 2, "adam": 3, "adadelta": 4}  # kernels/multi_tensor.py
# Compiled kernels want enough programs per SM; the interpreter wants few, large blocks.
_COMPILED_BLOCK, _COMPILED_CHUNK = 1024, 16384
_BLOCK, _CHUNK = (4096, 16384) if os.environ.get("TRITON_INTERPRET") == "1" else (_COMPILED_BLOCK, _COMPILED_CHUNK)
_MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on grid.x; a larger bucket takes several launches


@functools.cache
def _kernels():
    import triton.language as tl

    from pyfused.kernels import multi_tensor, norm, optimizers

    # dtype code (csrc/kernels.h) -> (storage type, opmath type); bfloat16 travels as raw bits.
    types = {0: (tl.float32, tl.float32), 1: (tl.float64, tl.float64), 2: (tl.float16, tl.float32),
             3: (tl.uint16, tl.float32), "step_float": tl.float32, "step_double": tl.float64}
    return types, multi_tensor, optimizers, norm


def _chunk_tables(numels, rows, device):
    """numels | address rows | chunk table (tensor, start) pairs, as one int64 device tensor."""
    counts = (numels + _CHUNK - 1) // _CHUNK
    tensor_of_chunk = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    starts = (torch.arange(len(tensor_of_chunk)) - first_chunk[tensor_of_chunk]) * _CHUNK
    chunks = torch.stack([tensor_of_chunk, starts], 1).flatten()
    tables = torch.cat([numels, rows.flatten(), chunks]).to(device)
    return tables, len(tensor_of_chunk), bool((rows % 16 == 0).all())


def _device_tables(bucket):
    """A bucket's numels, param and state addresses, each tensor's param group and chunk table;
    built once per plan."""
    rows = torch.frombuffer(bucket.addresses, dtype=torch.int64).view(-1, bucket.n)
    kept = torch.cat([rows[:1], rows[2:]])  # grads come with each step's upload
    numels = torch.frombuffer(bucket.numels, dtype=torch.int64)
    ends = torch.frombuffer(bucket.group_ends, dtype=torch.int64)
    groups = torch.repeat_interleave(torch.arange(len(ends)), torch.diff(ends, prepend=ends.new_zeros(1)))
    tables, n_chunks, _ = _chunk_tables(numels, torch.cat([kept, groups[None]]), bucket.device)
    return tables, n_chunks, len(kept) - 1, bool((kept % 16 == 0).all())


def norm_powered_sum(dtype_code, numels, addresses, kind, p, device) -> torch.Tensor:
    """The p-th power of the tensors' global norm (csrc/norm.h's kinds), as a float64 0-d device
    tensor: per-chunk partials from one launch, combined in chunk order without a host sync."""
    types, _, _, norm = _kernels()
    numels = torch.tensor(numels, dtype=torch.int64)
    tables, n_chunks, aligned = _chunk_tables(numels, torch.tensor([addresses], dtype=torch.int64), device)
    partials = torch.empty(n_chunks, dtype=torch.float64, device=device)
    storage, op = types[dtype_code]
    if n_chunks:
        norm.norm_partials_kernel[(n_chunks,)](
            tables, partials, len(numels), KIND=kind, P=float(p) if kind == 4 else 0.0, STORAGE=storage,
            BF16=dtype_code == 3, OP=op, CHUNK=_CHUNK, BLOCK=_BLOCK, ALIGNED=aligned,
            enable_fp_fusion=False,
        )
    if kind == 0:
        return partials.max() if n_chunks else torch.zeros((), dtype=torch.float64, device=device)
    if kind == 1:
        return partials.min() if n_chunks else torch.full((), float("inf"), dtype=torch.float64, device=device)
    return partials.sum()


def _stats_rows(bucket):
    """Each tensor's first chunk and chunk count ([2][n] int64 on the device), and the largest
    count: where stats_kernel finds a tensor's partials. Built once per plan."""
    rows = bucket.__dict__.get("triton_stats_rows")
    if rows is None:
        counts = (torch.frombuffer(bucket.numels, dtype=torch.int64) + _CHUNK - 1) // _CHUNK
        table = torch.stack([torch.cumsum(counts, 0) - counts, counts]).to(bucket.device)
        rows = bucket.triton_stats_rows = (table, int(counts.max()))
    return rows


def _average_tables(bucket, average):
    """average= (swa_utils._StepAverage): the averages' addresses on the device (rebuilt when
    they move) and the weight as a 0-d float64 device tensor (a new value never recompiles)."""
    addresses, weight = average
    cached = bucket.__dict__.get("triton_averages")
    if cached is None or cached[0] != addresses:
        table = torch.frombuffer(array.array("q", addresses), dtype=torch.int64).to(bucket.device)
        cached = bucket.triton_averages = (array.array("q", addresses), table, [None, None])
    if cached[2][0] != weight:
        cached[2][:] = [weight, torch.tensor(weight, dtype=torch.float64, device=bucket.device)]
    return cached[1], cached[2][1], functools.reduce(operator.or_, addresses, 0) % 16 == 0


def _launch_update(bucket, kernel, tables, uploads, n_chunks, n_states, aligned, hypers, grad_factor, skip,
                   stats=None, average=None):
    """stats: None, or the [4, n] float64 table for the step statistics (pyfused/optim/stats.py);
    average: None, or (addresses, weight) of average= (pyfused/optim/swa_utils.py)."""
    types, multi_tensor, optimizers, _ = _kernels()
    averages = weight = uploads
    if average is not None:
        averages, weight, average_aligned = _average_tables(bucket, average)
        aligned = aligned and average_aligned
    storage, op = types[bucket.dtype_code]
    factors = grad_factor.on_device(bucket.device) if grad_factor.active else uploads
    n_hyper = _cpp.HYPER_SIZES[kernel]
    partials = uploads if stats is None else torch.empty(3 * n_chunks, dtype=torch.float64, device=bucket.device)
    for first in range(0, n_chunks, _MAX_PROGRAMS):
        multi_tensor.optimizer_kernel[(min(n_chunks - first, _MAX_PROGRAMS),)](
            tables, uploads, factors, uploads if skip is None else skip, partials, averages, weight, bucket.n,
            len(bucket.group_ends), first, OPTIMIZER=_OPTIMIZERS[kernel], STORAGE=storage, BF16=bucket.dtype_code == 3, OP=op,
            STATES=n_states, N_HYPER=n_hyper, K=_cpp._C.scalars_per_tensor(_OPTIMIZERS[kernel]),
            # The groups of a launch share their state layout: the first group's flags are all's.
            **{"AMSGRAD": False, "MOMENTUM": False, "CENTERED": False,
               **optimizers.mode(kernel, tuple(hypers[:n_hyper]))},
            FACTORED=grad_factor.active, STORE_GRAD=grad_factor.store_grads, SKIP=skip is not None,
            STATS=stats is not None, AVERAGE=average is not None, CHUNK=_CHUNK, BLOCK=_BLOCK, ALIGNED=aligned,
            enable_fp_fusion=False,  # the only FMAs: the explicit ones, as in the C++ FMA builds
        )
    if stats is not None:
        rows, max_chunks = _stats_rows(bucket)
        block = 256  # tensors per program
        multi_tensor.stats_kernel[((bucket.n + block - 1) // block,)](
            partials, rows, stats, uploads if skip is None else skip, bucket.n, max_chunks,
            SKIP=skip is not None, BLOCK=block, enable_fp_fusion=False,
        )


def capturable_step(kernel: str, bucket, hyper, grad_factor, lr, found_inf, stats=None) -> None:
    """capturable=True: no host sync and no host data that changes from step to step, so the
    step can be captured in a CUDA graph. Two launches: the prologue advances the device step
    counters and derives lr and the per-tensor scalars on the device, then the update. The
    bucket holds one param group, whose Hyper is `hyper` (array('d'))."""
    types, multi_tensor, _, _ = _kernels()
    cached = bucket.__dict__.get("triton_tables")
    if cached is None:  # torch's capturable optimizers (Adam, AdamW, RMSprop) all count steps
        cached = bucket.triton_tables = _device_tables(bucket)
        bucket.triton_steps = torch.frombuffer(bucket.steps, dtype=torch.int64).to(bucket.device)
        bucket.triton_uploads = None
    tables, n_chunks, n_states, aligned = cached
    n = bucket.n
    optimizer = _OPTIMIZERS[kernel]
    k = _cpp._C.scalars_per_tensor(optimizer)

    # Grad addresses and hyperparameters go up only when they change (never, in a graph).
    host = array.array("q", bucket.addresses[n : 2 * n])
    host.frombytes(array.array("d", hyper).tobytes())
    if bucket.triton_uploads is None or host != bucket.triton_uploads_host:
        uploads = torch.zeros(n + len(hyper) + n * k, dtype=torch.int64, device=bucket.device)
        uploads[: len(host)] = torch.frombuffer(host, dtype=torch.int64).to(bucket.device)
        bucket.triton_uploads, bucket.triton_uploads_host = uploads, host
    uploads = bucket.triton_uploads
    if not isinstance(lr, torch.Tensor):  # a float lr is kept in a device scalar
        rate = bucket.__dict__.get("triton_lr")
        if rate is None or bucket.triton_lr_value != lr:
            rate = bucket.triton_lr = torch.full((), float(lr), dtype=torch.float64, device=bucket.device)
            bucket.triton_lr_value = lr
        lr = rate
    lr = lr.to(bucket.device)

    block = 1024  # tensors per prologue program
    multi_tensor.capturable_prologue_kernel[((n + block - 1) // block,)](
        bucket.triton_steps, uploads, lr, uploads if found_inf is None else found_inf, n,
        OPTIMIZER=optimizer, STEP=types["step_double" if bucket.steps_are_double else "step_float"],
        N_HYPER=len(hyper), K=k, SKIP=found_inf is not None, BLOCK=block, enable_fp_fusion=False,
    )
    aligned = aligned and functools.reduce(operator.or_, bucket.addresses[n : 2 * n], 0) % 16 == 0
    _launch_update(bucket, kernel, tables, uploads, n_chunks, n_states, aligned, hyper, grad_factor, found_inf,
                   stats)


def optimizer_step(kernel: str, bucket, hypers, grad_factor, stats=None, average=None) -> None:
    """hypers: array('d'), the Hyper of each of the bucket's param groups in turn; stats: None,
    or the [4, n] float64 table for the step statistics; average: None, or (addresses, weight)."""
    cached = bucket.__dict__.get("triton_tables")
    if cached is None:
        cached = bucket.triton_tables = _device_tables(bucket)
    tables, n_chunks, n_states, aligned = cached
    n = bucket.n
    k = _cpp._C.scalars_per_tensor(_OPTIMIZERS[kernel])

    # One upload per step: grad addresses, hypers and the per-tensor scalars (steps advance here).
    on_cuda = bucket.device.type == "cuda"
    host = torch.empty(n + len(hypers) + n * k, dtype=torch.int64, pin_memory=on_cuda)
    grads = bucket.addresses[n : 2 * n]
    host[:n] = torch.frombuffer(grads, dtype=torch.int64)
    host[n : n + len(hypers)] = torch.frombuffer(hypers, dtype=torch.int64)
    _cpp.tensor_scalars(kernel, bucket, hypers, host.data_ptr() + 8 * (n + len(hypers)))
    uploads = host.to(bucket.device, non_blocking=True) if on_cuda else host
    aligned = aligned and functools.reduce(operator.or_, grads, 0) % 16 == 0

    _launch_update(bucket, kernel, tables, uploads, n_chunks, n_states, aligned, hypers, grad_factor, None, stats,
                   average)


# Batch normalization (kernels/batchnorm.py): the same entry points as pyfused/_cpp.py's, on
# device tensors, without a host sync. The plan must match csrc/batchnorm.h's plan().
_BN_PART, _BN_MIN_ROWS, _BN_PLANAR_MIN = 4096, 16, 32
_BN_BLOCK = 1024  # elements per elementwise program, lanes per reduction program
_BN_CHANNELS = 128  # channels per per-channel program


def _bn_plan(shape):
    outer, channels, inner = shape
    if inner >= _BN_PLANAR_MIN:
        cols_per_b, n_b = min(inner, _BN_PART), -(-inner // _BN_PART)
        rows_per_a = max(1, _BN_PART // inner) if n_b == 1 else 1
        planar = True
    else:
        cols_per_b, n_b, planar = 1, inner, False
        rows_per_a = max(_BN_MIN_ROWS, _BN_PART // max(channels * inner, 1))
    return planar, -(-outer // rows_per_a), rows_per_a, n_b, cols_per_b


def _bn_storage(t):
    """(tensor as the kernel reads it, BF16 flag, opmath type): bfloat16 as int16 bits."""
    import triton.language as tl

    if t.dtype == torch.bfloat16:
        return t.view(torch.int16), True, tl.float32
    return t, False, tl.float64 if t.dtype == torch.float64 else tl.float32


def _bn_reduce(partials_kernel, merge_stats, shape, tensors, extra, relu=None):
    from pyfused.kernels import batchnorm

    outer, channels, inner = shape
    planar, n_a, rows_per_a, n_b, cols_per_b = _bn_plan(shape)
    device = tensors[0].device
    s1 = torch.empty(n_a * channels * n_b, dtype=torch.float64, device=device)
    s2 = torch.empty_like(s1)
    views = [_bn_storage(t)[0] for t in tensors]
    _, bf16, op = _bn_storage(tensors[0])
    grid = (n_a * channels * n_b,) if planar else (n_a, -(-(channels * inner) // _BN_BLOCK))
    flags = dict(BF16=bf16, OP=op, PLANAR=planar, BLOCK=_BN_BLOCK)
    if relu is not None:
        flags["RELU"] = relu
    partials_kernel[grid](*views, *extra, s1, s2, outer, channels, inner, n_b, rows_per_a, cols_per_b,
                          **flags, enable_fp_fusion=False)
    out = torch.empty(2, channels, dtype=torch.float64, device=device)
    batchnorm.merge_kernel[(-(-channels // _BN_CHANNELS),)](
        s1, s2, out, outer, channels, inner, n_a, n_b, rows_per_a, cols_per_b,
        STATS=merge_stats, BLOCK=_BN_CHANNELS, enable_fp_fusion=False)
    return out


def bn_stats(x, shape) -> torch.Tensor:
    from pyfused.kernels import batchnorm

    return _bn_reduce(batchnorm.stats_partials_kernel, True, shape, [x], [])


def bn_finalize(param_code, counts, stats, weight, bias, running_mean, running_var, momentum, eps):
    from pyfused.kernels import batchnorm

    groups, _, channels = stats.shape
    out = torch.empty(4, channels, dtype=torch.float64, device=stats.device)
    present = [t for t in (weight, bias, running_mean, running_var) if t is not None]
    dummy = out
    args = [dummy if t is None else _bn_storage(t)[0] for t in (weight, bias, running_mean, running_var)]
    batchnorm.finalize_kernel[(-(-channels // _BN_CHANNELS),)](
        counts if counts is not None else dummy, stats.contiguous(), *args, out, channels, groups,
        float(momentum), float(eps), HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        HAS_RUNNING=running_mean is not None, TRAINING=groups > 0,
        PBF16=bool(present) and present[0].dtype == torch.bfloat16, BLOCK=_BN_CHANNELS,
        enable_fp_fusion=False)
    return out


def bn_normalize(x, shape, scale, shift, relu) -> torch.Tensor:
    from pyfused.kernels import batchnorm

    y = torch.empty_like(x)
    xv, bf16, op = _bn_storage(x)
    batchnorm.normalize_kernel[(-(-x.numel() // _BN_BLOCK),)](
        xv, _bn_storage(y)[0], scale, shift, x.numel(), shape[1], shape[2], BF16=bf16, OP=op, RELU=relu,
        BLOCK=_BN_BLOCK, enable_fp_fusion=False)
    return y


def bn_grad_sums(dy, x, shape, mean, scale, shift, relu) -> torch.Tensor:
    from pyfused.kernels import batchnorm

    return _bn_reduce(batchnorm.grad_partials_kernel, False, shape, [dy, x], [mean, scale, shift], relu)


def bn_backward_finalize(param_code, count, training, sums, mean, invstd, weight, bias, dweight, dbias):
    from pyfused.kernels import batchnorm

    channels = sums.shape[1]
    out = torch.empty(6, channels, dtype=torch.float64, device=sums.device)
    saved = torch.stack([mean, invstd])
    present = [t for t in (weight, bias, dweight, dbias) if t is not None]
    args = [out if t is None else _bn_storage(t)[0] for t in (weight, bias, dweight, dbias)]
    batchnorm.backward_finalize_kernel[(-(-channels // _BN_CHANNELS),)](
        sums.contiguous(), saved, *args, out, channels, float(count), HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, WANT_DW=dweight is not None, WANT_DB=dbias is not None,
        TRAINING=training, PBF16=bool(present) and present[0].dtype == torch.bfloat16, BLOCK=_BN_CHANNELS,
        enable_fp_fusion=False)
    return out


def bn_grad_input(dy, x, shape, coefficients, relu, training) -> torch.Tensor:
    from pyfused.kernels import batchnorm

    dx = torch.empty_like(x)
    xv, bf16, op = _bn_storage(x)
    batchnorm.grad_input_kernel[(-(-x.numel() // _BN_BLOCK),)](
        _bn_storage(dy)[0], xv, _bn_storage(dx)[0], coefficients, x.numel(), shape[1], shape[2], BF16=bf16,
        OP=op, RELU=relu, TRAINING=training, BLOCK=_BN_BLOCK, enable_fp_fusion=False)
    return dx


@functools.cache
def _dropout_kernels():
    from pyfused.kernels import dropout

    return dropout


_DROPOUT_BLOCK = 16384 if os.environ.get("TRITON_INTERPRET") == "1" else 1024
_dropout_params = {}  # (p, scale, device) -> float64 [p, scale] on the device, uploaded once


def dropout(op, dtype_code, numel, group, seed, p, scale, x, out, residual=None, bias=None):
    """kernels/dropout.py on contiguous tensors: seed is a one-element int64 device tensor; p
    (a float32 value) and scale as csrc/kernels.h's DropoutCall takes them."""
    if numel == 0:
        return
    types, _, _, _ = _kernels()
    key = (p, scale, x.device)
    params = _dropout_params.get(key)
    if params is None:
        params = _dropout_params[key] = torch.tensor([p, scale], dtype=torch.float64, device=x.device)
    storage, opmath = types[dtype_code]
    if dtype_code == 3:  # bfloat16 travels as raw bits
        x, out = x.view(torch.uint16), out.view(torch.uint16)
        residual = residual.view(torch.uint16) if residual is not None else None
        bias = bias.view(torch.uint16) if bias is not None else None
    _dropout_kernels().dropout_kernel[((numel + _DROPOUT_BLOCK - 1) // _DROPOUT_BLOCK,)](
        x, out, x if residual is None else residual, x if bias is None else bias, seed, params,
        numel, group, 1 if bias is None else bias.numel(),
        STORAGE=storage, BF16=dtype_code == 3, OP=opmath, GROUPED=group != 1,
        ADD_RESIDUAL=op == _cpp.DROPOUT_ADD_RESIDUAL, BIAS=bias is not None, BLOCK=_DROPOUT_BLOCK,
        enable_fp_fusion=False,  # no FMA, so results match the C++ backend bit for bit
    )


# Weight averaging (kernels/averaging.py): pyfused/optim/swa_utils.py keeps the tables per plan.
def average_tables(numels, addresses, device):
    """(tables, n_chunks, aligned) on the device for array('q')s numels and addresses ([2][n])."""
    rows = torch.frombuffer(addresses, dtype=torch.int64).view(2, -1)
    return _chunk_tables(torch.frombuffer(numels, dtype=torch.int64), rows, device)


def average_lerp(dtype_code, n_tensors, tables, weight) -> None:
    """Lerps every average towards its model tensor by `weight`, a 0-d device tensor."""
    table, n_chunks, aligned = tables
    types, _, _, _ = _kernels()
    from pyfused.kernels import averaging

    storage, op = types[dtype_code]
    for first in range(0, n_chunks, _MAX_PROGRAMS):
        averaging.lerp_kernel[(min(n_chunks - first, _MAX_PROGRAMS),)](
            table, weight, n_tensors, first, STORAGE=storage, BF16=dtype_code == 3, OP=op,
            CHUNK=_CHUNK, BLOCK=_BLOCK, ALIGNED=aligned,
            enable_fp_fusion=False,  # the only FMA: lerp's explicit one, as in the C++ FMA builds
        )
