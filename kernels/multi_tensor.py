"""The multi-tensor driver for CUDA tensors: one launch updates every tensor of a bucket.

Each program takes one chunk (a tensor and a CHUNK-sized range of it) from the chunk table and
walks it in BLOCKs. Tensors are reached through int64 address tables, so the number of tensors
never changes the kernel. Layout of the two int64 buffers (pyfused/_triton.py builds them):

  tables   numels[n] | param addresses[n] | state addresses[STATES][n] | param group[n] |
           chunks[C][2] (tensor, start), built once per plan and kept on the device;
  uploads  grad addresses[n] | hyper[n_groups][N_HYPER] (float64 bits) | scalars[n][K] (float64
           bits), rebuilt every step (grads are new tensors, steps advance, schedulers move lr);
  factors  float64 [divisor, multiplier] for each grad, read on the device when FACTORED:
           GradScaler's scale (STORE_GRAD) and a deferred clip coefficient; see GradFactor in
           pyfused/optim/_fused.py;
  partials float64 [C][3], written when STATS (step statistics, pyfused/optim/stats.py): each
           chunk's sums of squares of the grad the update saw, of the change (new param as
           stored minus old) and of the old param, from the values the update holds anyway;
           stats_kernel adds each tensor's in chunk order;
  averages int64 [n] addresses and weight (0-d float64), read when AVERAGE (average= of the
           optimizers, pyfused/optim/swa_utils.py): after the update, each tensor's average is
           lerped towards the new param as stored, as AveragedModel.update_parameters would after
           the step, without loading the param again.

With capturable=True nothing comes from the host during a step, so a CUDA graph can replay it:
step counters live on the device, capturable_prologue_kernel advances them and writes lr and
the per-tensor scalars into `uploads` (whose grad addresses and other hyperparameters change
only when they do), and both kernels read GradScaler's found_inf on the device (SKIP). A
capturable launch holds one param group, whose lr is that device scalar.
"""

import triton
import triton.language as tl

from pyfused.kernels import optimizers

# The OPTIMIZER constexpr; pyfused/_triton.py maps kernel names to these.
SGD, ADAGRAD, RMSPROP, ADAM, ADADELTA = (tl.constexpr(i) for i in range(5))


@triton.jit
def _widen(raw, BF16: tl.constexpr, OP: tl.constexpr):
    if BF16:  # stored as uint16 bits: widening is exact
        return (raw.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return raw.to(OP)


@triton.jit
def _load(ptrs, mask, BF16: tl.constexpr, OP: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        raw = tl.load(ptrs, mask=mask, other=0)
    else:
        raw = tl.load(ptrs)
    return _widen(raw, BF16, OP)


@triton.jit
def _narrow(value, BF16: tl.constexpr, STORAGE: tl.constexpr):
    """An opmath value as stored in STORAGE (uint16 bits for bfloat16)."""
    if BF16:
        # Round to nearest even by hand: the interpreter truncates on .to(tl.bfloat16).
        bits = value.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return tl.where(value != value, 0x7FC0, rounded).to(tl.uint16)  # NaN as torch writes it
    else:
        return value.to(STORAGE)


@triton.jit
def _store(ptrs, value, mask, BF16: tl.constexpr, MASKED: tl.constexpr):
    value = _narrow(value, BF16, ptrs.dtype.element_ty)
    if MASKED:
        tl.store(ptrs, value, mask=mask)
    else:
        tl.store(ptrs, value)


@triton.jit
def _address(table, index, STORAGE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(table + index).to(tl.pointer_type(STORAGE))
    if ALIGNED:  # every address is 16-byte aligned: lets loads and stores use 128-bit accesses
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _chunk(chunks, first_chunk, numels, CHUNK: tl.constexpr, ALIGNED: tl.constexpr):
    """This program's chunk, from the (tensor, start) rows at `chunks`: its tensor and the element
    range [start, end) it covers."""
    row = chunks + 2 * (first_chunk + tl.program_id(0).to(tl.int64))
    t = tl.load(row)
    start = tl.load(row + 1)
    if ALIGNED:
        start = tl.multiple_of(start, CHUNK)
    return t, start, tl.minimum(start + CHUNK, tl.load(numels + t))


@triton.jit
def _update_block(
    param_ptr, grad_ptr, s0_ptr, s1_ptr, s2_ptr, index, end, hyper, scalars, factors,
    grad_sum, change_sum, param_sum, avg_ptr, weight,
    OPTIMIZER: tl.constexpr, BF16: tl.constexpr, OP: tl.constexpr, STATES: tl.constexpr,
    AMSGRAD: tl.constexpr, MOMENTUM: tl.constexpr, CENTERED: tl.constexpr, FACTORED: tl.constexpr,
    STORE_GRAD: tl.constexpr, STATS: tl.constexpr, AVERAGE: tl.constexpr, BLOCK: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Updates one block; with STATS, adds its squares of the grad, the change and the old param
    to the per-lane sums it returns (unchanged otherwise)."""
    mask = index < end
    p = _load(param_ptr + index, mask, BF16, OP, MASKED)
    g = _load(grad_ptr + index, mask, BF16, OP, MASKED)
    if STORE_GRAD:  # GradScaler's scale comes out, and the unscaled grad is stored back
        g = optimizers._div(g, tl.load(factors).to(OP), OP)
        _store(grad_ptr + index, g, mask, BF16, MASKED)
    if FACTORED:  # the clip coefficient (1 when there is none)
        g = g * tl.load(factors + 1).to(OP)
    s0 = tl.zeros([BLOCK], OP)
    s1 = tl.zeros([BLOCK], OP)
    s2 = tl.zeros([BLOCK], OP)
    if STATES > 0:
        s0 = _load(s0_ptr + index, mask, BF16, OP, MASKED)
    if STATES > 1:
        s1 = _load(s1_ptr + index, mask, BF16, OP, MASKED)
    if STATES > 2:
        s2 = _load(s2_ptr + index, mask, BF16, OP, MASKED)
    old = p
    if STATS:
        grad_sum += g * g
        param_sum += old * old  # masked lanes loaded 0

    if OPTIMIZER == SGD:
        p, s0, s1, s2 = optimizers.sgd(p, g, s0, s1, s2, hyper, scalars, OP, MOMENTUM)
    elif OPTIMIZER == ADAGRAD:
        p, s0, s1, s2 = optimizers.adagrad(p, g, s0, s1, s2, hyper, scalars, OP)
    elif OPTIMIZER == RMSPROP:
        p, s0, s1, s2 = optimizers.rmsprop(p, g, s0, s1, s2, hyper, scalars, OP, MOMENTUM, CENTERED)
    elif OPTIMIZER == ADADELTA:
        p, s0, s1, s2 = optimizers.adadelta(p, g, s0, s1, s2, hyper, scalars, OP)
    else:
        p, s0, s1, s2 = optimizers.adam(p, g, s0, s1, s2, hyper, scalars, OP, AMSGRAD)

    _store(param_ptr + index, p, mask, BF16, MASKED)
    if STATES > 0:
        _store(s0_ptr + index, s0, mask, BF16, MASKED)
    if STATES > 1:
        _store(s1_ptr + index, s1, mask, BF16, MASKED)
    if STATES > 2:
        _store(s2_ptr + index, s2, mask, BF16, MASKED)
    if STATS or AVERAGE:
        now = _widen(_narrow(p, BF16, param_ptr.dtype.element_ty), BF16, OP)  # the param as stored
    if AVERAGE:
        average = _load(avg_ptr + index, mask, BF16, OP, MASKED)
        _store(avg_ptr + index, optimizers._lerp(average, now, weight), mask, BF16, MASKED)
    if STATS:
        change = now - old
        if MASKED:  # an update of zeros need not be zero
            change = tl.where(mask, change, 0.0)
        change_sum += change * change
    return grad_sum, change_sum, param_sum


@triton.jit
def capturable_prologue_kernel(
    steps, uploads, lr, skip, n_tensors,
    OPTIMIZER: tl.constexpr, STEP: tl.constexpr, N_HYPER: tl.constexpr, K: tl.constexpr,
    SKIP: tl.constexpr, BLOCK: tl.constexpr,
):
    """steps: the address of each tensor's step counter (a 0-d STEP tensor on the device);
    lr: the learning rate, a 0-d device tensor; skip: GradScaler's found_inf (if SKIP)."""
    if SKIP:
        if tl.load(skip) != 0:
            return
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n_tensors
    counters = tl.load(steps + index, mask=mask, other=0).to(tl.pointer_type(STEP))
    step = tl.load(counters, mask=mask, other=0) + 1
    tl.store(counters, step, mask=mask)
    hyper = uploads + n_tensors
    rate = tl.load(lr).to(tl.float64)
    if tl.program_id(0) == 0:
        tl.store(hyper, rate.to(tl.int64, bitcast=True))
    first, second = optimizers.tensor_scalars(OPTIMIZER, step.to(tl.float64), rate, hyper)
    scalars = hyper + N_HYPER + index * K
    if K > 0:
        tl.store(scalars, first.to(tl.int64, bitcast=True), mask=mask)
    if K > 1:
        tl.store(scalars + 1, second.to(tl.int64, bitcast=True), mask=mask)


@triton.jit
def optimizer_kernel(
    tables, uploads, factors, skip, partials, averages, average_weight, n_tensors, n_groups, first_chunk,
    OPTIMIZER: tl.constexpr, STORAGE: tl.constexpr, BF16: tl.constexpr, OP: tl.constexpr,
    STATES: tl.constexpr, N_HYPER: tl.constexpr, K: tl.constexpr,
    AMSGRAD: tl.constexpr, MOMENTUM: tl.constexpr, CENTERED: tl.constexpr,
    FACTORED: tl.constexpr, STORE_GRAD: tl.constexpr, SKIP: tl.constexpr, STATS: tl.constexpr,
    AVERAGE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    if SKIP:  # GradScaler found inf or NaN: nothing moves
        if tl.load(skip) != 0:
            return
    t, start, end = _chunk(tables + (3 + STATES) * n_tensors, first_chunk, tables, CHUNK, ALIGNED)
    param_ptr = _address(tables + n_tensors, t, STORAGE, ALIGNED)
    grad_ptr = _address(uploads, t, STORAGE, ALIGNED)
    # Absent states alias the param: never loaded or stored, since STATES guards them.
    s0_ptr = param_ptr
    s1_ptr = param_ptr
    s2_ptr = param_ptr
    if STATES > 0:
        s0_ptr = _address(tables + 2 * n_tensors, t, STORAGE, ALIGNED)
    if STATES > 1:
        s1_ptr = _address(tables + 3 * n_tensors, t, STORAGE, ALIGNED)
    if STATES > 2:
        s2_ptr = _address(tables + 4 * n_tensors, t, STORAGE, ALIGNED)
    avg_ptr = param_ptr  # never loaded or stored without AVERAGE
    weight = 0.0
    if AVERAGE:
        avg_ptr = _address(averages, t, STORAGE, ALIGNED)
        weight = tl.load(average_weight).to(OP)
    group = tl.load(tables + (2 + STATES) * n_tensors + t)
    hyper = uploads + n_tensors + group * N_HYPER
    scalars = uploads + n_tensors + n_groups * N_HYPER + t * K

    # Whole blocks without a mask (a mask of unknown extent keeps loads from vectorizing),
    # then at most one masked block for the tail. Each lane keeps its own sums (STATS).
    grad_sum = tl.zeros([BLOCK], OP)
    change_sum = tl.zeros([BLOCK], OP)
    param_sum = tl.zeros([BLOCK], OP)
    full_end = start + (end - start) // BLOCK * BLOCK
    for offset in range(start, full_end, BLOCK):
        if ALIGNED:
            offset = tl.multiple_of(offset, BLOCK)
        grad_sum, change_sum, param_sum = _update_block(
            param_ptr, grad_ptr, s0_ptr, s1_ptr, s2_ptr, offset + tl.arange(0, BLOCK), end, hyper, scalars,
            factors, grad_sum, change_sum, param_sum, avg_ptr, weight, OPTIMIZER, BF16, OP, STATES, AMSGRAD,
            MOMENTUM, CENTERED, FACTORED, STORE_GRAD, STATS, AVERAGE, BLOCK, MASKED=False)
    if full_end < end:
        grad_sum, change_sum, param_sum = _update_block(
            param_ptr, grad_ptr, s0_ptr, s1_ptr, s2_ptr, full_end + tl.arange(0, BLOCK), end, hyper, scalars,
            factors, grad_sum, change_sum, param_sum, avg_ptr, weight, OPTIMIZER, BF16, OP, STATES, AMSGRAD,
            MOMENTUM, CENTERED, FACTORED, STORE_GRAD, STATS, AVERAGE, BLOCK, MASKED=True)
    if STATS:  # the lanes' sums in float64, by a fixed tree
        row = partials + 3 * (first_chunk + tl.program_id(0).to(tl.int64))
        tl.store(row, tl.sum(grad_sum.to(tl.float64), 0))
        tl.store(row + 1, tl.sum(change_sum.to(tl.float64), 0))
        tl.store(row + 2, tl.sum(param_sum.to(tl.float64), 0))


@triton.jit
def stats_kernel(partials, chunk_rows, out, skip, n_tensors, max_chunks, SKIP: tl.constexpr, BLOCK: tl.constexpr):
    """Step statistics from optimizer_kernel's partials: each tensor's chunks (chunk_rows: first
    chunk[n] | chunk count[n]) added in chunk order, then out ([4][n] float64): the norms of the
    grad, the change and the old param, and change norm / param norm. A skipped step writes
    nothing."""
    if SKIP:
        if tl.load(skip) != 0:
            return
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n_tensors
    first = tl.load(chunk_rows + i, mask=mask, other=0)
    count = tl.load(chunk_rows + n_tensors + i, mask=mask, other=0)
    grad = tl.zeros([BLOCK], tl.float64)
    change = tl.zeros([BLOCK], tl.float64)
    param = tl.zeros([BLOCK], tl.float64)
    for k in range(0, max_chunks):
        present = mask & (k < count)
        row = partials + 3 * (first + k)
        grad += tl.load(row, mask=present, other=0.0)
        change += tl.load(row + 1, mask=present, other=0.0)
        param += tl.load(row + 2, mask=present, other=0.0)
    change_norm = tl.sqrt(change)
    param_norm = tl.sqrt(param)
    tl.store(out + i, tl.sqrt(grad), mask=mask)
    tl.store(out + n_tensors + i, change_norm, mask=mask)
    tl.store(out + 2 * n_tensors + i, param_norm, mask=mask)
    tl.store(out + 3 * n_tensors + i, change_norm / param_norm, mask=mask)
