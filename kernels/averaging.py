"""Weight averaging for CUDA tensors: one launch lerps every average of a (device, dtype) group
towards the model's tensors (pyfused/optim/swa_utils.py; the C++ twin is csrc/averaging.h).

Uses the chunk table of kernels/multi_tensor.py with two address rows:
  tables  numels[n] | average addresses[n] | model addresses[n] | chunks[C][2] (tensor, start).
`weight` is a 0-d device tensor (float64, or torch's float32 SWA weight), read and rounded to
opmath once per program, so a weight that changes every call never recompiles the kernel.
"""

import triton
import triton.language as tl

from pyfused.kernels.multi_tensor import _address, _chunk, _load, _store
from pyfused.kernels.optimizers import _lerp


@triton.jit
def _lerp_block(avg_ptr, model_ptr, index, end, weight, BF16: tl.constexpr, OP: tl.constexpr,
                MASKED: tl.constexpr):
    mask = index < end
    average = _load(avg_ptr + index, mask, BF16, OP, MASKED)
    model = _load(model_ptr + index, mask, BF16, OP, MASKED)
    _store(avg_ptr + index, _lerp(average, model, weight), mask, BF16, MASKED)


@triton.jit
def lerp_kernel(
    tables, weight, n_tensors, first_chunk,
    STORAGE: tl.constexpr, BF16: tl.constexpr, OP: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    t, start, end = _chunk(tables + 3 * n_tensors, first_chunk, tables, CHUNK, ALIGNED)
    avg_ptr = _address(tables + n_tensors, t, STORAGE, ALIGNED)
    model_ptr = _address(tables + 2 * n_tensors, t, STORAGE, ALIGNED)
    w = tl.load(weight).to(OP)
    # Whole blocks unmasked, then at most one masked block (as kernels/multi_tensor.py does).
    full_end = start + (end - start) // BLOCK * BLOCK
    for offset in range(start, full_end, BLOCK):
        if ALIGNED:
            offset = tl.multiple_of(offset, BLOCK)
        _lerp_block(avg_ptr, model_ptr, offset + tl.arange(0, BLOCK), end, w, BF16, OP, MASKED=False)
    if full_end < end:
        _lerp_block(avg_ptr, model_ptr, full_end + tl.arange(0, BLOCK), end, w, BF16, OP, MASKED=True)
