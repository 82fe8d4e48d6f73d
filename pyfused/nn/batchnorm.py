"""Batch normalization: drop-ins for torch.nn.BatchNorm1d/2d/3d and torch.nn.SyncBatchNorm, and
BatchNormReLU1d/2d/3d (batch normalization with the ReLU fused into both passes).

One autograd.Function for all of them. Forward: one reduction pass for the per-channel mean and
variance (csrc/batchnorm.h says how they stay exact and thread-count independent), one
elementwise pass. Backward: one reduction pass for sum(dy) and sum(dy * (x - mean)), one
elementwise pass for dx; dweight and dbias come out of the reduction. Saved for backward: the
input (as torch's own batch norm saves it) and per-channel values, never a normalized copy.
BatchNormReLU saves the input and not its output: the ReLU's mask is recomputed from x with the
forward's rounding, and the output cannot replace x, because the clipped elements' normalized
values (which dx depends on through the mean terms) are not recoverable from zeros.

The tensors' device picks the backend (pyfused._backend): C++ on CPU, Triton on CUDA, torch's
own functions elsewhere and for dtypes without kernels. SyncBatchNorm all-gathers each process's
(count, mean, M2) per channel in one collective per forward (merged in rank order, so every rank
gets the same statistics) and all-reduces (sum dy, sum dy (x - mean)) in one per backward; it
runs on CPU tensors with gloo as well as on CUDA.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from pyfused import _backend, _cpp

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormReLU1d", "BatchNormReLU2d",
    "BatchNormReLU3d", "SyncBatchNorm", "batch_norm",
]

_HALF = (torch.float16, torch.bfloat16)
_PLAIN = (torch.Tensor, nn.Parameter)


def _kernels(device):
    """The backend module for this device, or None for torch's own implementation."""
    name = _backend.backend_for(device)
    if name == "cpp":
        return _cpp
    if name == "triton":
        from pyfused import _triton

        return _triton
    return None


def _addressable(*tensors):
    """Plain strided tensors with storage: anything else (DTensor and other wrapper subclasses,
    tensors without data) goes to torch's implementation, never to a kernel."""
    for t in tensors:  # a loop, not all(genexpr): this runs on every call of a small layer
        if t is not None and (
            type(t) not in _PLAIN or t.layout is not torch.strided or (t.data_ptr() == 0 and t.numel() != 0)
        ):
            return False
    return True


def _check(input, running_mean, running_var, weight, bias, training, eps, synced=False):
    """torch's checks and messages (F.batch_norm's, then the native op's), before anything moves.
    synced: the statistics span several processes, so one value here is enough (as in torch)."""
    if training and not synced:
        size = input.size()
        if size[0] * math.prod(size[2:]) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    if training and eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    channels = input.shape[1]
    if running_mean is None and not training:
        raise RuntimeError("running_mean must be defined in evaluation mode")
    dtype, device = input.dtype, input.device
    for t in (running_mean, running_var, weight, bias):  # the usual case first: all as the input's
        if t is not None and (t.numel() != channels or t.dtype != dtype or t.device != device):
            break
    else:
        return
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {t.numel()}")
    params = [t for t in (weight, bias, running_mean, running_var) if t is not None]
    for t in params:
        if t.device != input.device:
            raise RuntimeError(
                f"Expected all tensors to be on the same device, but found at least two devices, "
                f"{input.device} and {t.device}!"
            )
        if t.dtype != input.dtype:
            if t.dtype != torch.float32:
                raise RuntimeError("mixed dtype (CPU): expect parameter to have scalar type of Float")
            if input.dtype not in _HALF:
                raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")
    if len({t.dtype for t in params}) > 1:
        raise RuntimeError("mixed dtype (CPU): all inputs must share same datatype.")


def _dense(x):
    """x (copied only if it is neither contiguous nor channels-innermost) and its (outer, C,
    inner) view; outputs made with empty_like keep its layout."""
    n, c, inner = x.shape[0], x.shape[1], math.prod(x.shape[2:])
    if x.is_contiguous():
        return x, (n, c, inner)
    if x.dim() > 2 and x.movedim(1, -1).is_contiguous():  # channels_last, channels_last_3d, (N, L, C)^T
        return x, (n * inner, c, 1)
    return x.contiguous(), (n, c, inner)


def _same_layout(t, like):
    if t.stride() == like.stride() and t.is_contiguous() == like.is_contiguous():
        return t
    return torch.empty_like(like).copy_(t)


def _flat(t):
    return None if t is None else t if t.is_contiguous() else t.contiguous()


def _split_forward(kernels, xd, shape, param_code, w, b, stats_out, training, momentum, eps, relu, group):
    """The forward in separate steps (Triton, and SyncBatchNorm, whose collective sits between the
    statistics and their finalization): (y, saved, count over every process)."""
    channels = shape[1]
    count = shape[0] * shape[2]
    per_channel = dict(device=xd.device, dtype=torch.float64)
    if training:
        local = kernels.bn_stats(xd, shape) if count else torch.zeros(2, channels, **per_channel)
        if group is not None:
            import torch.distributed as dist

            packed = torch.cat([torch.full((1,), float(count), **per_channel), local.flatten()])
            gathered = packed.new_empty(dist.get_world_size(group) * packed.numel())  # flat, for gloo
            dist.all_gather_into_tensor(gathered, packed, group=group)
            gathered = gathered.view(-1, packed.numel())
            counts = gathered[:, 0].contiguous()
            stats = gathered[:, 1:].reshape(-1, 2, channels)
            count = int(counts.sum().item())
        else:
            counts = torch.full((1,), float(count), **per_channel)
            stats = local[None]
    else:
        counts, stats = None, torch.empty(0, 2, channels, **per_channel)
    if count == 0:  # torch: an empty batch leaves the running stats as they are
        saved = torch.zeros(4, channels, **per_channel)
    else:
        saved = kernels.bn_finalize(param_code, counts, stats, w, b, *stats_out, momentum, eps)
    y = kernels.bn_normalize(xd, shape, saved[2], saved[3], relu) if xd.numel() else torch.empty_like(xd)
    return y, saved, count


def _split_backward(kernels, dy, xd, shape, saved, param_code, count, w, b, needs, training, relu, group):
    """The backward in separate steps (Triton, and SyncBatchNorm, whose collective sits between
    the grad sums and dx)."""
    need_x, need_w, need_b = needs
    dweight = torch.zeros_like(w) if need_w else None
    dbias = torch.zeros_like(b) if need_b else None
    if xd.numel() == 0 and group is None:
        return torch.empty_like(xd) if need_x else None, dweight, dbias
    mean, invstd = saved[0], saved[1]
    if xd.numel():
        sums = kernels.bn_grad_sums(dy, xd, shape, mean, saved[2], saved[3], relu)
    else:
        sums = torch.zeros(2, shape[1], device=xd.device, dtype=torch.float64)
    if group is not None:
        # dweight and dbias are this process's share, as with torch's SyncBatchNorm (DDP sums
        # them); dx needs the sums over every process.
        kernels.bn_backward_finalize(param_code, count, training, sums, mean, invstd, w, b, dweight, dbias)
        if need_x:
            import torch.distributed as dist

            dist.all_reduce(sums, group=group)
        coefficients = kernels.bn_backward_finalize(param_code, count, training, sums, mean, invstd, w, b, None, None)
    else:
        coefficients = kernels.bn_backward_finalize(param_code, count, training, sums, mean, invstd, w, b, dweight, dbias)
    dx = None
    if need_x:
        dx = kernels.bn_grad_input(dy, xd, shape, coefficients, relu, training) if xd.numel() else torch.empty_like(xd)
    return dx, dweight, dbias


class _BatchNorm(torch.autograd.Function):
    """On CPU without a process group, one C++ call per forward and one per backward
    (csrc/batchnorm.h's forward and backward); otherwise the steps one by one."""

    @staticmethod
    def forward(ctx, x, weight, bias, options):
        # options: (running_mean, running_var, training, momentum, eps, relu, group, kernels) as
        # one argument, since apply walks every argument on each call (the running stats get no
        # gradient, as in torch)
        running_mean, running_var, training, momentum, eps, relu, group, kernels = options
        param = weight if weight is not None else next(
            (t for t in (bias, running_mean, running_var) if t is not None), None)
        param_code = _cpp.DTYPE_CODES[param.dtype if param is not None else torch.float32]
        xd, shape = _dense(x)
        w, b = _flat(weight), _flat(bias)
        # The running stats are updated in place: a non-contiguous one goes through a copy.
        stats_out = (_flat(running_mean), _flat(running_var))
        if kernels is _cpp and group is None:
            y, saved = _cpp.bn_forward(xd, shape, param_code, w, b, *stats_out, training, momentum, eps, relu)
            count = shape[0] * shape[2]
        else:
            y, saved, count = _split_forward(kernels, xd, shape, param_code, w, b, stats_out, training, momentum,
                                             eps, relu, group)
        if stats_out[0] is not running_mean:
            running_mean.copy_(stats_out[0])
        if stats_out[1] is not running_var:
            running_var.copy_(stats_out[1])
        ctx.save_for_backward(xd, w, b)
        # saved: made here and seen nowhere else, so it needs no version check
        ctx.config = (saved, param_code, shape, count, training, relu, group, kernels)
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph: these grads refuse a double backward clearly
            return _backward_once(ctx, dy)
        return _backward(ctx, dy)


def _backward(ctx, dy):
    xd, w, b = ctx.saved_tensors
    saved, param_code, shape, count, training, relu, group, kernels = ctx.config
    if not (dy.is_contiguous() and xd.is_contiguous()):  # both dense row-major: the same layout
        dy = _same_layout(dy, xd)
    needs = ctx.needs_input_grad
    if kernels is _cpp and group is None:
        grads = _cpp.bn_backward(dy, xd, shape, saved, param_code, w, b, needs[0], needs[1], needs[2], training, relu)
    else:
        grads = _split_backward(kernels, dy, xd, shape, saved, param_code, count, w, b, needs[:3], training, relu,
                                group)
    return grads + (None,)


# the kernels are not differentiable; once_differentiable's no_grad block and checks cost a
# small layer's call a few microseconds, so only a backward that builds a graph goes through it
_backward_once = once_differentiable(_backward)


def _torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, relu):
    y = F.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return torch.relu(y) if relu else y


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
               eps=1e-5, *, relu=False):
    """torch.nn.functional.batch_norm, fused; relu=True applies a ReLU inside the same passes."""
    kernels = _fusable(input, running_mean, running_var, weight, bias)
    if kernels is None:
        return _torch_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, relu)
    _check(input, running_mean, running_var, weight, bias, training, eps)
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, relu, None, kernels)


def _fusable(input, *others):
    """The backend module for these tensors, or None for torch's implementation. Looked up once
    per call: the forward and the backward use it as it is."""
    if input.dim() >= 2 and input.dtype in _cpp.DTYPE_CODES and _addressable(input, *others):
        return _kernels(input.device)
    return None


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, relu, group, kernels):
    """After _check: the fused function."""
    return _BatchNorm.apply(input, weight, bias, (running_mean, running_var, bool(training), float(momentum),
                                                  float(eps), relu, group, kernels))


class _Fused:
    """forward() for the module classes: torch's _BatchNorm.forward with the fused function, and
    the checks made before num_batches_tracked moves (torch counts a batch it then refuses)."""

    _relu = False

    def _buffers_and_factor(self, input, synced=False):
        """(running_mean, running_var, weight, bias, bn_training, factor, kernels). The parameters
        and buffers are read from their dicts once: each `self.weight` is a Module.__getattr__ call,
        which a small layer's per-call cost notices."""
        params, buffers = self._parameters, self._buffers
        weight, bias = params.get("weight"), params.get("bias")
        running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
        if self.training:
            bn_training = True
        else:
            bn_training = running_mean is None and running_var is None
        if self.training and not self.track_running_stats:
            running_mean = running_var = None
        kernels = _fusable(input, running_mean, running_var, weight, bias)
        if kernels is not None:
            _check(input, running_mean, running_var, weight, bias, bn_training, self.eps, synced)
        factor = 0.0 if self.momentum is None else self.momentum
        tracked = buffers.get("num_batches_tracked")
        if self.training and self.track_running_stats and tracked is not None:
            tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(tracked)
        return running_mean, running_var, weight, bias, bn_training, factor, kernels

    def forward(self, input):
        self._check_input_dim(input)
        running_mean, running_var, weight, bias, bn_training, factor, kernels = self._buffers_and_factor(input)
        if kernels is None:
            return _torch_batch_norm(input, running_mean, running_var, weight, bias, bn_training, factor,
                                     self.eps, self._relu)
        return _batch_norm(input, running_mean, running_var, weight, bias, bn_training, factor, self.eps,
                           self._relu, None, kernels)


class BatchNorm1d(_Fused, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d, fused."""


class BatchNorm2d(_Fused, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d, fused."""


class BatchNorm3d(_Fused, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d, fused."""


class BatchNormReLU1d(_Fused, nn.BatchNorm1d):
    """torch.nn.BatchNorm1d followed by torch.relu, in the batch norm's passes."""

    _relu = True


class BatchNormReLU2d(_Fused, nn.BatchNorm2d):
    """torch.nn.BatchNorm2d followed by torch.relu, in the batch norm's passes."""

    _relu = True


class BatchNormReLU3d(_Fused, nn.BatchNorm3d):
    """torch.nn.BatchNorm3d followed by torch.relu, in the batch norm's passes."""

    _relu = True


class SyncBatchNorm(_Fused, nn.SyncBatchNorm):
    """torch.nn.SyncBatchNorm, fused, on CPU (gloo) as well as CUDA tensors. Without an
    initialized process group, or with one process, it is BatchNorm."""

    def forward(self, input):
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if _fusable(input, self.running_mean, self.running_var, self.weight, self.bias) is None:
            y = nn.SyncBatchNorm.forward(self, input)  # torch's, with its device rules
            return torch.relu(y) if self._relu else y
        group = None
        if self.training and torch.distributed.is_available() and torch.distributed.is_initialized():
            group = self.process_group or torch.distributed.group.WORLD
            if torch.distributed.get_world_size(group) == 1:
                group = None
        running_mean, running_var, weight, bias, bn_training, factor, kernels = self._buffers_and_factor(
            input, group is not None)
        return _batch_norm(input, running_mean, running_var, weight, bias, bn_training, factor, self.eps,
                           self._relu, group, kernels)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """torch's convert_sync_batchnorm, to pyfused's SyncBatchNorm (a BatchNormReLU becomes a
        SyncBatchNorm with the ReLU still fused)."""
        output = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            kind = _SyncBatchNormReLU if getattr(module, "_relu", False) else SyncBatchNorm
            output = kind(module.num_features, module.eps, module.momentum, module.affine,
                          module.track_running_stats, process_group, bias=module.bias is not None)
            if module.affine:
                with torch.no_grad():
                    output.weight = module.weight
                    output.bias = module.bias
            output.running_mean = module.running_mean
            output.running_var = module.running_var
            output.num_batches_tracked = module.num_batches_tracked
            output.training = module.training
            if hasattr(module, "qconfig"):
                output.qconfig = module.qconfig
        for name, child in module.named_children():
            output.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return output


class _SyncBatchNormReLU(SyncBatchNorm):
    """What convert_sync_batchnorm makes of a BatchNormReLU: SyncBatchNorm, then ReLU, fused."""

    _relu = True
