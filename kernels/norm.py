"""The global norm's reduction for CUDA tensors: one partial per chunk, in a fixed order.

Uses the chunk table of kernels/multi_tensor.py (numels[n] | addresses[n] | chunks[C][2]). Each
program folds its chunk into BLOCK lanes, reduces the lanes with a fixed tree and writes one
float64 partial; the caller combines the partials. Nothing depends on the grid's scheduling.
KIND is csrc/norm.h's NormKind: 0 max |x|, 1 min |x|, 2 sum |x|, 3 sum x^2, 4 sum |x|^P (P is
compile-time: a norm type rarely changes during training; |x|^P is exp2(P log2 |x|), which the
interpreter supports too).
"""

import triton
import triton.language as tl

from pyfused.kernels.multi_tensor import _address, _load


@triton.jit
def _max_nan(a, b):
    return tl.where((b > a) | (b != b), b, a)


@triton.jit
def _min_nan(a, b):
    return tl.where((b < a) | (b != b), b, a)


@triton.jit
def norm_partials_kernel(
    tables, partials, n_tensors,
    KIND: tl.constexpr, P: tl.constexpr, STORAGE: tl.constexpr, BF16: tl.constexpr, OP: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    chunk = tl.program_id(0).to(tl.int64)
    info = tables + 2 * n_tensors + 2 * chunk
    t = tl.load(info)
    start = tl.load(info + 1)
    end = tl.minimum(start + CHUNK, tl.load(tables + t))
    ptr = _address(tables + n_tensors, t, STORAGE, ALIGNED)
    identity = float("inf") if KIND == 1 else 0.0
    acc = tl.full([BLOCK], identity, OP)
    for offset in range(start, end, BLOCK):
        index = offset + tl.arange(0, BLOCK)
        mask = index < end
        x = tl.abs(_load(ptr + index, mask, BF16, OP, True))
        if KIND == 0:
            acc = tl.where(mask, _max_nan(acc, x), acc)
        elif KIND == 1:
            acc = tl.where(mask, _min_nan(acc, x), acc)
        elif KIND == 2:
            acc += tl.where(mask, x, 0.0)
        elif KIND == 3:
            acc += tl.where(mask, x * x, 0.0)
        else:
            acc += tl.where(mask, tl.exp2(P * tl.log2(x)), 0.0)
    if KIND == 0 or KIND == 1:
        # tl.max and tl.min drop NaN; torch's norm keeps it.
        partial = tl.max(acc, 0) if KIND == 0 else tl.min(acc, 0)
        partial = tl.where(tl.sum((acc != acc).to(tl.int32), 0) > 0, float("nan"), partial)
    else:
        partial = tl.sum(acc, 0)
    tl.store(partials + chunk, partial.to(tl.float64))
