"""Gradient clipping by global norm: drop-ins for torch.nn.utils' functions, plus fused clipping.

get_total_norm makes one pass per (device, dtype) group over all its tensors: C++ on CPU, Triton
on CUDA, summed in a fixed order (the result depends on neither the thread count nor the grid).
With `group=`, ranks all-reduce the p-th powers of their shards' norms and take the root once,
so sharded grads (ZeRO, FSDP) clip by the true global norm.

Fused clipping: clip_grad_norm_(..., optimizer=opt) computes the norm but does not scale the
grads; opt's next step() multiplies the clip coefficient in inside its kernels. The grads are
then read twice per step (norm, update) instead of three times (norm, scale, update), and the
scaling pass's write is gone. p.grad keeps its unclipped values.
"""

import array
import functools
import math
import operator
import types
import warnings

import torch

from pyfused import _backend, _cpp
from pyfused.optim._fused import _is_dense

_DTYPE_CODES = _cpp.DTYPE_CODES
_dtype_of = operator.attrgetter("dtype")
_device_of = operator.attrgetter("device")
_grad_of = operator.attrgetter("grad")
_COUNT = -1  # p = 0: torch counts the tensors whose norm is nonzero


def _kind(p: float) -> int:
    if p == math.inf:
        return _cpp.NORM_MAX_ABS
    if p == -math.inf:
        return _cpp.NORM_MIN_ABS
    if p == 0:
        return _COUNT
    if p == 1:
        return _cpp.NORM_SUM_ABS
    if p == 2:
        return _cpp.NORM_SUM_SQUARES
    return _cpp.NORM_SUM_POW


def _merge(kind, parts):
    """Combines powered sums, in the order given."""
    stacked = torch.stack(parts)
    if kind == _cpp.NORM_MAX_ABS:
        return stacked.max()
    if kind == _cpp.NORM_MIN_ABS:
        return stacked.min()
    return stacked.sum()


def _root(kind, powered, p):
    if kind == _cpp.NORM_SUM_SQUARES:
        return powered.sqrt()
    if kind == _cpp.NORM_SUM_POW:
        return powered.pow(1.0 / p)
    return powered


def _group_powered_sum(tensors, kind, p, device, dtype):
    """The powered sum of one (device, dtype) group, as a float64 0-d tensor on its device."""
    backend = _backend.backend_for(device)
    if kind == _COUNT or dtype not in _DTYPE_CODES or backend == "torch":
        # What has no kernel keeps torch's own per-tensor norms (p = 0, complex, other devices).
        norms = torch._foreach_norm(tensors, p) if device.type in ("cpu", "cuda") else [
            torch.linalg.vector_norm(t, p) for t in tensors]
        norms = torch.stack(norms).double()
        if kind == _COUNT:
            return (norms != 0).sum().double()
        return _merge(kind, list(norms.abs() ** p if kind in (_cpp.NORM_SUM_ABS, _cpp.NORM_SUM_SQUARES, _cpp.NORM_SUM_POW) else norms))
    # Any dense layout will do: the norm does not care about element order.
    dense = [t if t.is_contiguous() or _is_dense(t) else t.contiguous() for t in tensors]
    numels = array.array("q", map(torch.Tensor.numel, dense))
    addresses = array.array("q", map(torch.Tensor.data_ptr, dense))
    if backend == "cpp":
        value = _cpp.norm_powered_sum(_DTYPE_CODES[dtype], numels, addresses, kind, p)
        return torch.tensor(value, dtype=torch.float64)
    from pyfused import _triton

    return _triton.norm_powered_sum(_DTYPE_CODES[dtype], numels, addresses, kind, p, device)


def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None, *, group=None):
    """torch.nn.utils.get_total_norm, in one pass per (device, dtype) group.

    ``foreach`` is accepted for compatibility and has no effect. ``group``: a process group whose
    ranks each hold a shard; the result is the norm over all shards. (For norm_type 0, torch's
    count of nonzero tensors, a tensor split across ranks counts once per rank holding a nonzero
    piece of it.)
    """
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    norm_type = float(norm_type)
    if len(tensors) == 0 and group is None:
        return torch.tensor(0.0)
    kind = _kind(norm_type)
    first_device = tensors[0].device if tensors else torch.device("cpu")
    dtypes = {_real(d) for d in set(map(_dtype_of, tensors))}
    result_dtype = functools.reduce(torch.promote_types, dtypes) if dtypes else torch.float32
    if group is not None:
        tensors = [t for t in tensors if t.numel()]  # an empty shard is normal under ZeRO/FSDP
    elif kind in (_cpp.NORM_MAX_ABS, _cpp.NORM_MIN_ABS) and not all(map(torch.Tensor.numel, tensors)):
        # torch's messages: max and min have no identity to give an empty tensor
        which = "_foreach_norm cannot compute the infinity" if kind == _cpp.NORM_MAX_ABS else "linalg.vector_norm cannot compute the -inf"
        raise RuntimeError(f"{which} norm on an empty tensor because the operation does not have an identity")
    devices, dtypes = set(map(_device_of, tensors)), set(map(_dtype_of, tensors))
    if len(devices) == 1 and len(dtypes) == 1:  # the usual case: no per-tensor grouping
        by_kind = {(devices.pop(), dtypes.pop()): tensors} if tensors else {}
    else:
        by_kind = {}
        for t, key in zip(tensors, zip(map(_device_of, tensors), map(_dtype_of, tensors))):
            by_kind.setdefault(key, []).append(t)
    with torch.no_grad():
        parts = [
            _group_powered_sum(ts, kind, norm_type, device, dtype).to(first_device)
            for (device, dtype), ts in by_kind.items()
        ]
        if group is not None:
            identity = math.inf if kind == _cpp.NORM_MIN_ABS else 0.0
            powered = _merge(kind, parts) if parts else torch.tensor(identity, dtype=torch.float64, device=first_device)
            _all_reduce(powered, kind, group)
        else:
            powered = _merge(kind, parts)
        total = _root(kind, powered, norm_type).to(result_dtype)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`"
        )
    return total


def _real(dtype):
    return _cpp.REAL_DTYPES.get(dtype, dtype)


def _all_reduce(powered, kind, group):
    import torch.distributed as dist

    op = {_cpp.NORM_MAX_ABS: dist.ReduceOp.MAX, _cpp.NORM_MIN_ABS: dist.ReduceOp.MIN}.get(kind, dist.ReduceOp.SUM)
    dist.all_reduce(powered, op=op, group=group)


def _ids_with_grad(params):
    return {id(p) for p, g in zip(params, map(_grad_of, params)) if g is not None}


def clip_grads_with_norm_(parameters, max_norm, total_norm, foreach=None, *, optimizer=None):
    """torch.nn.utils.clip_grads_with_norm_; with ``optimizer``, the scaling is deferred into that
    pyfused optimizer's next step instead of rewriting the grads now."""
    if optimizer is None:
        return torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm, foreach)
    if not hasattr(optimizer, "defer_grad_multiplier"):
        raise TypeError(f"optimizer= takes a pyfused optimizer, not {type(optimizer).__name__}")
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    stepped = [p for g in optimizer.param_groups for p in g["params"]]
    if _ids_with_grad(parameters) != _ids_with_grad(stepped):
        raise ValueError(
            "clip_grads_with_norm_(optimizer=...) scales every grad the optimizer steps, so "
            "`parameters` must be exactly the optimizer's params that have grads"
        )
    coefficient = torch.clamp(float(max_norm) / (total_norm + 1e-6), max=1.0)
    optimizer.defer_grad_multiplier(coefficient)


def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None, *,
                    group=None, optimizer=None):
    """torch.nn.utils.clip_grad_norm_; returns the total norm.

    ``group``: see get_total_norm. ``optimizer``: a pyfused optimizer whose next step() applies
    the clip coefficient in its kernels (the grads themselves are left unclipped).
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        is_generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)
        if is_generator and len(parameters) == 0:
            warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=2)
    grads = [g for g in map(_grad_of, parameters) if g is not None]
    total_norm = get_total_norm(grads, norm_type, error_if_nonfinite, foreach, group=group)
    clip_grads_with_norm_(parameters, max_norm, total_norm, foreach, optimizer=optimizer)
    return total_norm
