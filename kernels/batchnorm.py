"""Batch normalization for CUDA tensors: the passes of csrc/batchnorm.h, with the same meaning.

A tensor is (outer, C, inner), element (o, c, i) at (o * C + c) * inner + i. Reductions use the
C++ backend's partitions (pyfused/_triton.py computes the same plan): PLANAR programs take one
partition (a block of planes times a block of columns of one channel), row programs a block of
rows times BLOCK columns. Partition sums are written in plan order and merged per channel in that
order by one more kernel, so nothing depends on the grid. Everything accumulates in float64:
elements are widened right after the load (an fp32 square is exact in double). Per-channel
values are float64 arrays; the elementwise passes round them to OP once per element block.
bfloat16 travels as int16 bits (BF16), as in kernels/multi_tensor.py.
"""

import triton
import triton.language as tl

from pyfused.kernels.multi_tensor import _load, _store


@triton.jit
def _partition(pid, C, n_b, rows_per_a, cols_per_b, outer, inner):
    b = pid % n_b
    c = pid // n_b % C
    a = pid // n_b // C
    rows = tl.minimum(rows_per_a, outer - a * rows_per_a)
    cols = tl.minimum(cols_per_b, inner - b * cols_per_b)
    start = (a * rows_per_a * C + c) * inner + b * cols_per_b
    return c, rows, cols, start


@triton.jit
def stats_partials_kernel(
    x, s1, s2, outer, C, inner, n_b, rows_per_a, cols_per_b,
    BF16: tl.constexpr, OP: tl.constexpr, PLANAR: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per partition: S = sum x and M2 = sum (x - S / n)^2 (two passes over the partition)."""
    pid = tl.program_id(0).to(tl.int64)
    W = C * inner
    lanes = tl.arange(0, BLOCK)
    if PLANAR:
        c, rows, cols, start = _partition(pid, C, n_b, rows_per_a, cols_per_b, outer, inner)
        total = tl.zeros([BLOCK], tl.float64)
        for r in range(0, rows):
            for j in range(0, cols, BLOCK):
                m = j + lanes < cols
                total += tl.where(m, _load(x + start + r * W + j + lanes, m, BF16, OP, True).to(tl.float64), 0.0)
        s = tl.sum(total, 0)
        mean = s / (rows * cols).to(tl.float64)
        dev = tl.zeros([BLOCK], tl.float64)
        for r in range(0, rows):
            for j in range(0, cols, BLOCK):
                m = j + lanes < cols
                d = _load(x + start + r * W + j + lanes, m, BF16, OP, True).to(tl.float64) - mean
                dev += tl.where(m, d * d, 0.0)
        tl.store(s1 + pid, s)
        tl.store(s2 + pid, tl.sum(dev, 0))
    else:
        a = pid
        w = tl.program_id(1).to(tl.int64) * BLOCK + lanes
        m = w < W
        rows = tl.minimum(rows_per_a, outer - a * rows_per_a)
        base = x + a * rows_per_a * W + w
        total = tl.zeros([BLOCK], tl.float64)
        for r in range(0, rows):
            total += _load(base + r * W, m, BF16, OP, True).to(tl.float64)
        mean = total / rows.to(tl.float64)
        dev = tl.zeros([BLOCK], tl.float64)
        for r in range(0, rows):
            d = _load(base + r * W, m, BF16, OP, True).to(tl.float64) - mean
            dev += d * d
        tl.store(s1 + a * W + w, total, mask=m)
        tl.store(s2 + a * W + w, dev, mask=m)


@triton.jit
def merge_kernel(
    s1, s2, out, outer, C, inner, n_a, n_b, rows_per_a, cols_per_b,
    STATS: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[0][c], out[1][c]: the statistics' (mean, M2), merged with the parallel-axis formula,
    or (STATS false) plain sums, over channel c's partitions in plan order."""
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = c < C
    t1 = tl.zeros([BLOCK], tl.float64)
    t2 = tl.zeros([BLOCK], tl.float64)
    for a in range(0, n_a):
        for b in range(0, n_b):
            k = (a * C + c) * n_b + b
            t1 += tl.load(s1 + k, mask=m, other=0.0)
            if not STATS:
                t2 += tl.load(s2 + k, mask=m, other=0.0)
    if STATS:
        mean = t1 / (outer * inner).to(tl.float64)
        for a in range(0, n_a):
            rows = tl.minimum(rows_per_a, outer - a * rows_per_a)
            for b in range(0, n_b):
                cols = tl.minimum(cols_per_b, inner - b * cols_per_b)
                count = (rows * cols).to(tl.float64)
                k = (a * C + c) * n_b + b
                d = tl.load(s1 + k, mask=m, other=0.0) / count - mean
                t2 += tl.load(s2 + k, mask=m, other=0.0) + count * d * d
        t1 = mean
    tl.store(out + c, t1, mask=m)
    tl.store(out + C + c, t2, mask=m)


@triton.jit
def _pload(ptrs, m, PBF16: tl.constexpr):
    """A parameter or running stat, widened to float64."""
    return _load(ptrs, m, PBF16, tl.float64, True).to(tl.float64)


@triton.jit
def _pstore(ptrs, value, m, PBF16: tl.constexpr):
    if PBF16:  # rounded from float, as the C++ backend does
        value = value.to(tl.float32)
    _store(ptrs, value, m, PBF16, True)


@triton.jit
def _param(ptr, c, m, HAS: tl.constexpr, PBF16: tl.constexpr, default):
    if HAS:
        return _pload(ptr + c, m, PBF16)
    else:
        return tl.zeros_like(c).to(tl.float64) + default


@triton.jit
def finalize_kernel(
    counts, stats, weight, bias, running_mean, running_var, out, C, groups, momentum, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RUNNING: tl.constexpr, TRAINING: tl.constexpr,
    PBF16: tl.constexpr, BLOCK: tl.constexpr,
):
    """stats: [groups][2][C] (mean, M2); out: [4][C] save_mean, save_invstd, scale, shift."""
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = c < C
    if TRAINING:
        n = tl.zeros([BLOCK], tl.float64)
        total = tl.zeros([BLOCK], tl.float64)
        for g in range(0, groups):
            count = tl.load(counts + g)
            if count != 0:  # a process with an empty batch has no mean
                n += count
                total += count * tl.load(stats + g * 2 * C + c, mask=m, other=0.0)
        mean = total / n
        dev = tl.zeros([BLOCK], tl.float64)
        for g in range(0, groups):
            count = tl.load(counts + g)
            if count != 0:
                d = tl.load(stats + g * 2 * C + c, mask=m, other=0.0) - mean
                dev += tl.load(stats + g * 2 * C + C + c, mask=m, other=0.0) + count * d * d
        var = dev / n
        if HAS_RUNNING:
            rm = _pload(running_mean + c, m, PBF16)
            rv = _pload(running_var + c, m, PBF16)
            _pstore(running_mean + c, momentum * mean + (1 - momentum) * rm, m, PBF16)
            _pstore(running_var + c, momentum * (dev / (n - 1)) + (1 - momentum) * rv, m, PBF16)
    else:
        mean = _pload(running_mean + c, m, PBF16)
        var = _pload(running_var + c, m, PBF16)
    invstd = 1.0 / tl.sqrt(var + eps)  # float64: sqrt.rn, exact division
    scale = _param(weight, c, m, HAS_WEIGHT, PBF16, 1.0) * invstd
    shift = _param(bias, c, m, HAS_BIAS, PBF16, 0.0) - mean * scale
    tl.store(out + c, mean, mask=m)
    tl.store(out + C + c, invstd, mask=m)
    tl.store(out + 2 * C + c, scale, mask=m)
    tl.store(out + 3 * C + c, shift, mask=m)


@triton.jit
def _channel(index, C, inner):
    return index // inner % C


@triton.jit
def _masked(dy, x, scale, shift, RELU: tl.constexpr):
    if RELU:  # the forward's x * scale + shift, rounded the same way
        return tl.where(x * scale + shift > 0, dy, 0.0)
    else:
        return dy


@triton.jit
def normalize_kernel(x, y, scale, shift, numel, C, inner, BF16: tl.constexpr, OP: tl.constexpr,
                     RELU: tl.constexpr, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = index < numel
    c = _channel(index, C, inner)
    a = tl.load(scale + c, mask=m, other=0.0).to(OP)
    b = tl.load(shift + c, mask=m, other=0.0).to(OP)
    v = _load(x + index, m, BF16, OP, True) * a + b
    if RELU:
        v = tl.where(v < 0, 0.0, v)  # NaN stays NaN
    _store(y + index, v, m, BF16, True)


@triton.jit
def grad_partials_kernel(
    dy, x, mean, scale, shift, s1, s2, outer, C, inner, n_b, rows_per_a, cols_per_b,
    BF16: tl.constexpr, OP: tl.constexpr, PLANAR: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per partition: sum dy and sum dy * (x - mean), dy masked by the ReLU."""
    pid = tl.program_id(0).to(tl.int64)
    W = C * inner
    lanes = tl.arange(0, BLOCK)
    if PLANAR:
        c, rows, cols, start = _partition(pid, C, n_b, rows_per_a, cols_per_b, outer, inner)
        mu = tl.load(mean + c)
        a = tl.load(scale + c).to(OP)
        b = tl.load(shift + c).to(OP)
        t1 = tl.zeros([BLOCK], tl.float64)
        t2 = tl.zeros([BLOCK], tl.float64)
        for r in range(0, rows):
            for j in range(0, cols, BLOCK):
                m = j + lanes < cols
                offset = start + r * W + j + lanes
                xv = _load(x + offset, m, BF16, OP, True)
                g = _masked(_load(dy + offset, m, BF16, OP, True), xv, a, b, RELU).to(tl.float64)
                t1 += g
                t2 += g * (xv.to(tl.float64) - mu)
        tl.store(s1 + pid, tl.sum(t1, 0))
        tl.store(s2 + pid, tl.sum(t2, 0))
    else:
        pa = pid
        w = tl.program_id(1).to(tl.int64) * BLOCK + lanes
        m = w < W
        c = _channel(w, C, inner)
        mu = tl.load(mean + c, mask=m, other=0.0)
        a = tl.load(scale + c, mask=m, other=0.0).to(OP)
        b = tl.load(shift + c, mask=m, other=0.0).to(OP)
        rows = tl.minimum(rows_per_a, outer - pa * rows_per_a)
        t1 = tl.zeros([BLOCK], tl.float64)
        t2 = tl.zeros([BLOCK], tl.float64)
        for r in range(0, rows):
            offset = (pa * rows_per_a + r) * W + w
            xv = _load(x + offset, m, BF16, OP, True)
            g = _masked(_load(dy + offset, m, BF16, OP, True), xv, a, b, RELU).to(tl.float64)
            t1 += g
            t2 += g * (xv.to(tl.float64) - mu)
        tl.store(s1 + pa * W + w, t1, mask=m)
        tl.store(s2 + pa * W + w, t2, mask=m)


@triton.jit
def backward_finalize_kernel(
    sums, saved, weight, bias, dweight, dbias, out, C, count,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, WANT_DW: tl.constexpr, WANT_DB: tl.constexpr,
    TRAINING: tl.constexpr, PBF16: tl.constexpr, BLOCK: tl.constexpr,
):
    """sums [2][C]; saved [2][C] mean, invstd; out [6][C] as in csrc/batchnorm.h."""
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = c < C
    sum_dy = tl.load(sums + c, mask=m, other=0.0)
    sum_dy_xmu = tl.load(sums + C + c, mask=m, other=0.0)
    mean = tl.load(saved + c, mask=m, other=0.0)
    invstd = tl.load(saved + C + c, mask=m, other=0.0)
    if WANT_DW:
        _pstore(dweight + c, sum_dy_xmu * invstd, m, PBF16)
    if WANT_DB:
        _pstore(dbias + c, sum_dy, m, PBF16)
    scale = _param(weight, c, m, HAS_WEIGHT, PBF16, 1.0) * invstd
    shift = _param(bias, c, m, HAS_BIAS, PBF16, 0.0) - mean * scale
    gm = tl.zeros([BLOCK], tl.float64)
    k = tl.zeros([BLOCK], tl.float64)
    if TRAINING:
        gm = sum_dy / count
        k = sum_dy_xmu * invstd * invstd / count
    tl.store(out + c, mean, mask=m)
    tl.store(out + C + c, gm, mask=m)
    tl.store(out + 2 * C + c, k, mask=m)
    tl.store(out + 3 * C + c, scale, mask=m)
    tl.store(out + 4 * C + c, scale, mask=m)
    tl.store(out + 5 * C + c, shift, mask=m)


@triton.jit
def grad_input_kernel(dy, x, dx, coefficients, numel, C, inner, BF16: tl.constexpr, OP: tl.constexpr,
                      RELU: tl.constexpr, TRAINING: tl.constexpr, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = index < numel
    c = _channel(index, C, inner)
    xv = _load(x + index, m, BF16, OP, True)
    g = tl.load(coefficients + 3 * C + c, mask=m, other=0.0).to(OP)
    d = _masked(_load(dy + index, m, BF16, OP, True), xv,
                tl.load(coefficients + 4 * C + c, mask=m, other=0.0).to(OP),
                tl.load(coefficients + 5 * C + c, mask=m, other=0.0).to(OP), RELU)
    if TRAINING:
        mu = tl.load(coefficients + c, mask=m, other=0.0).to(OP)
        gm = tl.load(coefficients + C + c, mask=m, other=0.0).to(OP)
        k = tl.load(coefficients + 2 * C + c, mask=m, other=0.0).to(OP)
        v = ((d - gm) - (xv - mu) * k) * g
    else:
        v = d * g
    _store(dx + index, v, m, BF16, True)
