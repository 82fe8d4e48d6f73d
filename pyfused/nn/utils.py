"""Gradient clipping by global norm: drop-ins for torch.nn.utils' functions, plus fused clipping.

get_total_norm makes one pass per (device, dtype) group over all its tensors: C++ on CPU, Triton
on CUDA, summed in a fixed order (the result depends on neither the thread count nor the grid).
With `group=`, ranks all-reduce the p-th powers of their shards' norms and take the root once,
so sharded grads (ZeRO, FSDP) clip by the true global norm.

DTensor grads (FSDP2, tensor parallelism) need no group: each rank sums the powers of its local
shards, then the sums are all-reduced once per mesh dimension the grads are sharded over, and
never over a Replicate dimension (under HSDP, the replicas hold equal copies: summing them would
count each element once per replica). An empty local shard adds the identity (0, or inf for
p = -inf). The result is a Replicate DTensor on the grads' mesh, as torch returns.

Fused clipping: clip_grad_norm_(..., optimizer=opt) computes the norm but does not scale the
grads; opt's next step() multiplies the clip coefficient in inside its kernels. The grads are
then read twice per step (norm, update) instead of three times (norm, scale, update), and the
scaling pass's write is gone. p.grad keeps its unclipped values.

flat=True arenas: handed all the grads of one pyfused optimizer's arena, clip_grad_norm_ takes
the norm of, and scales, its grad buffers: one span per buffer, not one per tensor (see
pyfused/optim/_arena.py for when the buffers stand for the grads).
"""

import array
import functools
import math
import operator
import types
import warnings

import torch

from pyfused import _backend, _cpp
from pyfused.optim._arena import grad_buffers_of
from pyfused.optim._fused import _check_addressable, _dtensor_type, _is_dense

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
    """The powered sum of one (device, dtype) group: a float from the C++ kernels, else a float64
    0-d tensor on its device (for p = 0: each tensor's count of nonzero elements, a vector)."""
    backend = _backend.backend_for(device)
    if kind == _COUNT or dtype not in _DTYPE_CODES or backend == "torch":
        # What has no kernel keeps torch's own per-tensor norms (p = 0, complex, other devices).
        norms = torch._foreach_norm(tensors, p) if device.type in ("cpu", "cuda") else [
            torch.linalg.vector_norm(t, p) for t in tensors]
        norms = torch.stack(norms).double()
        if kind == _COUNT:
            return norms
        return _merge(kind, list(norms.abs() ** p if kind in (_cpp.NORM_SUM_ABS, _cpp.NORM_SUM_SQUARES, _cpp.NORM_SUM_POW) else norms))
    if set(map(type, tensors)) - {torch.Tensor, torch.nn.Parameter}:  # subclasses: may have no memory
        for t in tensors:
            _check_addressable(t, "get_total_norm", "a tensor")
    # Any dense layout will do: the norm does not care about element order.
    dense = [t if t.is_contiguous() or _is_dense(t) else t.contiguous() for t in tensors]
    numels = array.array("q", map(torch.Tensor.numel, dense))
    addresses = array.array("q", map(torch.Tensor.data_ptr, dense))
    if 0 in addresses and any(n and not a for n, a in zip(numels, addresses)):
        for t in dense:
            _check_addressable(t, "get_total_norm", "a tensor")  # names freed storage
    if backend == "cpp":
        return _cpp.norm_powered_sum(_DTYPE_CODES[dtype], numels, addresses, kind, p)  # a float
    from pyfused import _triton

    return _triton.norm_powered_sum(_DTYPE_CODES[dtype], numels, addresses, kind, p, device)


def _local_powered_sum(tensors, kind, p, device):
    """The powered sum of tensors on this rank, merged over their (device, dtype) groups, on
    `device` (p = 0: the per-tensor counts, concatenated in group order). Empty: the identity."""
    devices, dtypes = set(map(_device_of, tensors)), set(map(_dtype_of, tensors))
    if len(devices) == 1 and len(dtypes) == 1:  # the usual case: no per-tensor grouping
        by_kind = {(devices.pop(), dtypes.pop()): tensors}
    else:
        by_kind = {}
        for t, key in zip(tensors, zip(map(_device_of, tensors), map(_dtype_of, tensors))):
            by_kind.setdefault(key, []).append(t)
    parts = [torch.as_tensor(_group_powered_sum(ts, kind, p, d, dtype), dtype=torch.float64).to(device)
             for (d, dtype), ts in by_kind.items() if ts]
    if kind == _COUNT:
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    if not parts:
        return torch.tensor(math.inf if kind == _cpp.NORM_MIN_ABS else 0.0, dtype=torch.float64, device=device)
    return _merge(kind, parts)


def _sharded_dims(t):
    """The mesh dimensions a DTensor is sharded over: its norm is all-reduced over these only."""
    dims = []
    for dim, placement in enumerate(t.placements):
        if placement.is_shard():
            dims.append(dim)
        elif not placement.is_replicate():  # Partial: the values are not the grads yet
            raise RuntimeError(
                f"get_total_norm: a DTensor with placements {tuple(t.placements)}; a Partial tensor "
                "holds unreduced values whose norm is not the tensor's: redistribute it first"
            )
    return tuple(dims)


def _by_reduction(tensors):
    """{None: plain tensors, (mesh, sharded dims): those DTensors' local shards}, in first-seen order."""
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(t, dtensor) for t in tensors):
        return {None: tensors}
    groups = {}
    for t in tensors:
        key = None
        if isinstance(t, dtensor):
            key = (t.device_mesh, _sharded_dims(t))
            t = t._local_tensor
        groups.setdefault(key, []).append(t)
    return groups


def get_total_norm(tensors, norm_type=2.0, error_if_nonfinite=False, foreach=None, *, group=None):
    """torch.nn.utils.get_total_norm, in one pass per (device, dtype) group.

    ``foreach`` is accepted for compatibility and has no effect. ``group``: a process group whose
    ranks each hold a shard of the plain tensors; the result is the norm over all shards. (For
    norm_type 0, torch's count of nonzero tensors, a plain tensor split across ranks counts once
    per rank holding a nonzero piece of it; a DTensor counts once.) DTensors are reduced over
    their own meshes (see the module docstring) and make the result a Replicate DTensor when they
    share one mesh.
    """
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    norm_type = float(norm_type)
    if len(tensors) == 0 and group is None:
        return torch.tensor(0.0)
    kind = _kind(norm_type)
    dtypes = {_real(d) for d in set(map(_dtype_of, tensors))}
    result_dtype = functools.reduce(torch.promote_types, dtypes) if dtypes else torch.float32
    if group is None and kind in (_cpp.NORM_MAX_ABS, _cpp.NORM_MIN_ABS) and not all(map(torch.Tensor.numel, tensors)):
        # torch's messages: max and min have no identity to give an empty tensor (a DTensor's
        # numel is its global one: an empty local shard of a nonempty DTensor is fine)
        which = "_foreach_norm cannot compute the infinity" if kind == _cpp.NORM_MAX_ABS else "linalg.vector_norm cannot compute the -inf"
        raise RuntimeError(f"{which} norm on an empty tensor because the operation does not have an identity")
    reductions = _by_reduction(tensors)
    first_device = next(iter(reductions.values()))[0].device if tensors else torch.device("cpu")
    if group is None and len(reductions) == 1 and None in reductions and kind in (
            _cpp.NORM_SUM_SQUARES, _cpp.NORM_SUM_ABS, _cpp.NORM_MAX_ABS, _cpp.NORM_MIN_ABS):
        # The usual case, kept free of tensor ops (they cost more than the kernel on small grads):
        # one (device, dtype) group on the C++ backend; sqrt is correctly rounded in both.
        devices, dtypes = set(map(_device_of, tensors)), set(map(_dtype_of, tensors))
        if len(devices) == 1 and len(dtypes) == 1:
            device, dtype = devices.pop(), dtypes.pop()
            if dtype in _DTYPE_CODES and _backend.backend_for(device) == "cpp":
                powered = _group_powered_sum(tensors, kind, norm_type, device, dtype)  # no autograd: a float
                total = math.sqrt(powered) if kind == _cpp.NORM_SUM_SQUARES else powered
                if result_dtype in (torch.float32, torch.float64):  # one rounding either way
                    total = torch.tensor(total, dtype=result_dtype)
                else:  # 16-bit: the general path's own conversion (from a float64 tensor)
                    total = torch.tensor(total, dtype=torch.float64).to(result_dtype)
                return _checked_finite(total, norm_type, error_if_nonfinite)
    meshes = [key[0] for key in reductions if key is not None]
    with torch.no_grad():
        parts = []
        for key, ts in reductions.items():
            if key is None and group is not None:
                ts = [t for t in ts if t.numel()]  # an empty shard is normal under ZeRO/FSDP
            powered = _local_powered_sum(ts, kind, norm_type, first_device)
            if key is None and group is not None:
                if kind == _COUNT:  # per rank, as documented
                    powered = (powered != 0).sum().double()
                _all_reduce(powered, kind, group)
            elif key is not None:
                mesh, dims = key
                for dim in dims:  # never a Replicate dimension
                    _all_reduce(powered, kind, mesh.get_group(dim))
            parts.append((powered != 0).sum().double() if kind == _COUNT and powered.dim() else powered)
        total = _root(kind, _merge(kind, parts), norm_type).to(result_dtype)
    _checked_finite(total, norm_type, error_if_nonfinite)
    if meshes and all(m == meshes[0] for m in meshes):
        from torch.distributed.tensor import DTensor, Replicate

        total = DTensor.from_local(total, meshes[0], [Replicate()] * meshes[0].ndim, run_check=False)
    return total


def _checked_finite(total, norm_type, error_if_nonfinite):
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
    if isinstance(total_norm, _dtensor_type() or ()):
        total_norm = total_norm.full_tensor()  # the kernels take a plain 0-d multiplier
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
    buffers = _arena_buffers(grads, norm_type)
    total_norm = get_total_norm(buffers or grads, norm_type, error_if_nonfinite, foreach, group=group)
    if buffers is not None:  # on the first grad's device, as torch's (the buffers come per arena)
        total_norm = total_norm.to(grads[0].device)
    if buffers is None or optimizer is not None:
        clip_grads_with_norm_(parameters, max_norm, total_norm, foreach, optimizer=optimizer)
    else:
        # torch's clip_grads_with_norm_ on the buffers: its coefficient, its multiply per element
        coefficient = torch.clamp(float(max_norm) / (total_norm + 1e-6), max=1.0)
        for buffer in buffers:
            if foreach is False:
                buffer.mul_(coefficient.to(buffer.device))
            else:
                torch._foreach_mul_([buffer], coefficient.to(buffer.device))
    return total_norm


def _arena_buffers(grads, norm_type):
    """The grad buffers of a flat=True arena when they stand for `grads` in the norm and the
    scaling; else None. Not for p = 0 (it counts tensors), nor for max and min over an arena with
    an empty grad (torch raises there), nor off CPU and CUDA (torch's foreach choice differs)."""
    buffers = grad_buffers_of(grads)
    if buffers is None or any(b.device.type not in ("cpu", "cuda") for b in buffers):
        return None
    kind = _kind(float(norm_type))
    if kind == _COUNT or (kind in (_cpp.NORM_MAX_ABS, _cpp.NORM_MIN_ABS) and not all(map(torch.Tensor.numel, grads))):
        return None
    return buffers
