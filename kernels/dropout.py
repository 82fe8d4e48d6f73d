"""Dropout for CUDA tensors, the mask recomputed from (seed, index) instead of stored.

Element i is kept iff its draw d = i // group is above p, and is then multiplied by scale (1/(1-p)
rounded as torch rounds it for the dtype); a dropped element is multiplied by 0, like torch's
input * noise. Draw d is word d % 4 of tl.rand4x(seed, d // 4): one Philox call per four draws.
csrc/dropout.h computes the same thing on the CPU, bit for bit. The seed (int64)
is read from the device, so drawing it from torch's CUDA generator needs no host sync; p (a
float32 value) and scale come as float64 from `params`, since a float argument would be
rounded to float32.
"""

import triton
import triton.language as tl

from pyfused.kernels.multi_tensor import _load, _store


@triton.jit
def _rounded(value, BF16: tl.constexpr, STORAGE: tl.constexpr):
    """value rounded to the storage type and back, as torch's op-by-op 16-bit math rounds."""
    if BF16:  # round to nearest even by hand: the interpreter truncates on .to(tl.bfloat16)
        bits = value.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return tl.where(value != value, value, bits.to(tl.float32, bitcast=True))
    else:
        return value.to(STORAGE).to(value.dtype)


@triton.jit
def dropout_kernel(
    x_ptr, out_ptr, residual_ptr, bias_ptr, seed_ptr, params_ptr, numel, group, bias_numel,
    STORAGE: tl.constexpr, BF16: tl.constexpr, OP: tl.constexpr, GROUPED: tl.constexpr,
    ADD_RESIDUAL: tl.constexpr, BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    """out = x * mask * scale, or with ADD_RESIDUAL residual + dropout(x + bias), each op rounded
    to the storage type like torch's unfused expression; bias lies along the last dimension."""
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < numel
    seed = tl.load(seed_ptr)
    p = tl.load(params_ptr).to(tl.float32)
    scale = tl.load(params_ptr + 1).to(OP)
    if GROUPED:  # a draw per channel, its word picked per element
        draw = index // group
        u0, u1, u2, u3 = tl.rand4x(seed, draw // 4)
        word = draw % 4
        uniform = tl.where(word == 0, u0, tl.where(word == 1, u1, tl.where(word == 2, u2, u3)))
    else:  # the block's draws from BLOCK // 4 counters, their words in order
        counter = tl.program_id(0).to(tl.int64) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
        u0, u1, u2, u3 = tl.rand4x(seed, counter)
        uniform = tl.interleave(tl.interleave(u0, u2), tl.interleave(u1, u3))
    multiplier = tl.where(uniform > p, scale, tl.zeros_like(scale))
    x = _load(x_ptr + index, inside, BF16, OP, True)
    if ADD_RESIDUAL:
        if BIAS:
            x = _rounded(x + _load(bias_ptr + index % bias_numel, inside, BF16, OP, True), BF16, STORAGE)
        out = _load(residual_ptr + index, inside, BF16, OP, True) + _rounded(x * multiplier, BF16, STORAGE)
    else:
        out = x * multiplier
    _store(out_ptr + index, out, inside, BF16, True)
