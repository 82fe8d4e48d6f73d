"""The CUDA backend: one launch of kernels/multi_tensor.py's driver per bucket and step.

Imported on the first step that needs it, so `import pyfused` never imports triton. The same
code runs CPU tensors under the Triton interpreter (TRITON_INTERPRET=1), which is how CI tests it.
"""

import functools
import operator
import os

import torch

from pyfused import _cpp

_OPTIMIZERS = {"sgd": 0, "adagrad": 1, "rmsprop": 2, "adam": 3}  # kernels/multi_tensor.py
# Compiled kernels want enough programs per SM; the interpreter wants few, large blocks.
_COMPILED_BLOCK, _COMPILED_CHUNK = 1024, 16384
_BLOCK, _CHUNK = (4096, 16384) if os.environ.get("TRITON_INTERPRET") == "1" else (_COMPILED_BLOCK, _COMPILED_CHUNK)
_MAX_PROGRAMS = 2**31 - 1  # CUDA's limit on grid.x; a larger bucket takes several launches


@functools.cache
def _kernels():
    import triton.language as tl

    from pyfused.kernels import multi_tensor

    # dtype code (csrc/kernels.h) -> (storage type, opmath type); bfloat16 travels as raw bits.
    types = {0: (tl.float32, tl.float32), 1: (tl.float64, tl.float64), 2: (tl.float16, tl.float32),
             3: (tl.uint16, tl.float32)}
    return multi_tensor, types


def _device_tables(bucket):
    """numels, param and state addresses and the chunk table, on the device; built once per plan."""
    n = bucket.n
    rows = torch.frombuffer(bucket.addresses, dtype=torch.int64).view(-1, n)
    kept = torch.cat([rows[:1], rows[2:]])  # grads come with each step's upload
    numels = torch.frombuffer(bucket.numels, dtype=torch.int64)
    counts = (numels + _CHUNK - 1) // _CHUNK
    tensor_of_chunk = torch.repeat_interleave(torch.arange(n), counts)
    first_chunk = torch.cumsum(counts, 0) - counts
    starts = (torch.arange(len(tensor_of_chunk)) - first_chunk[tensor_of_chunk]) * _CHUNK
    chunks = torch.stack([tensor_of_chunk, starts], 1).flatten()
    tables = torch.cat([numels, kept.flatten(), chunks]).to(bucket.device)
    aligned = bool((kept % 16 == 0).all())
    return tables, len(tensor_of_chunk), len(kept) - 1, aligned


def optimizer_step(kernel: str, bucket, hyper: tuple) -> None:
    multi_tensor, types = _kernels()
    cached = bucket.__dict__.get("triton_tables")
    if cached is None:
        cached = bucket.triton_tables = _device_tables(bucket)
    tables, n_chunks, n_states, aligned = cached
    n = bucket.n
    optimizer = _OPTIMIZERS[kernel]
    k = _cpp._C.scalars_per_tensor(optimizer)

    # One upload per step: grad addresses, hyper and the per-tensor scalars (steps advance here).
    on_cuda = bucket.device.type == "cuda"
    host = torch.empty(n + len(hyper) + n * k, dtype=torch.int64, pin_memory=on_cuda)
    grads = bucket.addresses[n : 2 * n]
    host[:n] = torch.frombuffer(grads, dtype=torch.int64)
    host[n : n + len(hyper)] = torch.tensor(hyper, dtype=torch.float64).view(torch.int64)
    _cpp.tensor_scalars(kernel, bucket, hyper, host.data_ptr() + 8 * (n + len(hyper)))
    uploads = host.to(bucket.device, non_blocking=True) if on_cuda else host
    aligned = aligned and functools.reduce(operator.or_, grads, 0) % 16 == 0

    storage, op = types[bucket.dtype_code]
    from pyfused.kernels import optimizers

    for first in range(0, n_chunks, _MAX_PROGRAMS):
        multi_tensor.optimizer_kernel[(min(n_chunks - first, _MAX_PROGRAMS),)](
            tables, uploads, n, first,
            OPTIMIZER=optimizer, STORAGE=storage, BF16=bucket.dtype_code == 3, OP=op,
            STATES=n_states, N_HYPER=len(hyper), K=k,
            **{"AMSGRAD": False, "L2": False, "MOMENTUM": False, "NESTEROV": False, "CENTERED": False,
               **optimizers.mode(kernel, hyper)},
            CHUNK=_CHUNK, BLOCK=_BLOCK, ALIGNED=aligned,
            enable_fp_fusion=False,  # no FMA, so results match the C++ backend bit for bit
        )
