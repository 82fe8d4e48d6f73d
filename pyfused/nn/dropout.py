"""Dropout whose mask is never stored: drop-ins for torch's dropout functions and modules.

Element i of the input (its position in row-major order, whatever the memory layout) is kept
iff its draw is above p: word i % 4 of tl.rand4x(seed, i // 4), Triton's Philox-4x32-10
counter-based generator (one Philox call per four elements), and is then
multiplied by 1/(1-p), rounded exactly as torch's CPU dropout rounds it for the dtype; a
dropped element is multiplied by 0, as in torch's `input * noise`. Dropout1d/2d/3d draw once
per channel instead, at the channel's index in N*C order. The seed is one 64-bit draw per call
from torch's generator for the input's device (or `generator`), so `torch.manual_seed` makes a
run reproducible; backward recomputes the mask from it, so autograd keeps one int64 per call,
nothing per element. The C++ (CPU) and Triton (CUDA) kernels give the same mask and the same
bits for the same seed, on any thread count.

What has no kernel (other dtypes, devices, tensor subclasses, a forced "torch" backend) runs
torch's own dropout. The output has the strides torch's gives (its `input * noise`: a dense
input's strides, channels_last included); the mask stays a function of the row-major index, so a
non-contiguous input is computed on a contiguous copy, then laid out as torch lays it out.
"""

import functools
import math
import warnings

import torch
from torch.overrides import handle_torch_function, has_torch_function_unary

from pyfused import _backend, _cpp

_DTYPE_CODES = _cpp.DTYPE_CODES
_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _check_p(p):
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")


@functools.lru_cache(maxsize=256)
def _scale(p, dtype):
    """The kept elements' multiplier as torch's CPU dropout computes it, noise.div_(1 - p) in
    the dtype: for float32 that is 1 / float32(1 - p), not float32(1 / (1 - p))."""
    return torch.ones((), dtype=dtype).div_(1 - p).item()


@functools.lru_cache(maxsize=256)
def _as_float32(p):
    """The draws are float32 and compared with p in float32, as `tl.rand4x(...) > p` compiles."""
    return torch.tensor(p, dtype=torch.float32).item()


def _backend_of(t):
    """The kernel backend for t, or None where torch's own dropout must run."""
    if type(t) not in _PLAIN_TYPES or t.dtype not in _DTYPE_CODES:
        return None
    backend = _backend.backend_for(t.device)
    if backend == "torch" or (t.numel() and t.data_ptr() == 0):
        return None
    return backend


def _draw_seed(device, generator):
    """One 64-bit draw, kept on the device (no host sync on CUDA)."""
    return torch.empty(1, dtype=torch.int64, device=device).random_(generator=generator)


def _launch(op, x, out, seed, p, group, residual=None, bias=None, fresh_out=False, backend=None):
    """The kernel on contiguous tensors (out may be x); fresh_out: out was just allocated;
    backend: _backend_of(x), where the caller knows it."""
    code = _DTYPE_CODES[x.dtype]
    p32, scale = _as_float32(p), _scale(p, x.dtype)
    if (backend or _backend_of(x)) == "cpp":
        _cpp.dropout(op, code, x.numel(), group, seed.item(), p32, scale, x.data_ptr(), out.data_ptr(),
                     0 if residual is None else residual.data_ptr(), 0 if bias is None else bias.data_ptr(),
                     0 if bias is None else bias.numel(), fresh_out)
    else:
        from pyfused import _triton

        _triton.dropout(op, code, x.numel(), group, seed, p32, scale, x, out, residual, bias)


def _torch_strides(expression, *tensors):
    """The strides of torch's result of expression(*tensors), found on the meta device: the
    layout rules of torch's elementwise ops (TensorIterator) without touching any data."""
    metas = [None if t is None else torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
             for t in tensors]
    return expression(*metas).stride()


def _dropout_expression(x, feature):
    """torch's _dropout_impl's product: noise is empty_like(input), or (N, C, 1, ...) for
    feature dropout, and the result is input * noise."""
    noise_shape = x.shape[:2] + (1,) * (x.dim() - 2) if feature else None
    noise = torch.empty_like(x) if noise_shape is None else x.new_empty(noise_shape)
    return x * noise


def _laid_out_as_torch(result, strides):
    """result (contiguous) in a tensor with the given strides (result itself if they agree)."""
    if result.stride() == strides:
        return result
    return torch.empty_strided(result.shape, strides, dtype=result.dtype, device=result.device).copy_(result)


def _masked(x, seed, p, group, inplace, feature, backend=None):
    """x times its mask and scale, laid out as torch lays out its dropout's output; inplace
    writes into x (through a contiguous copy if need be)."""
    if x.is_contiguous():
        if inplace:
            _launch(_cpp.DROPOUT_SCALE, x, x, seed, p, group, backend=backend)
            if not x.is_inference():
                torch.autograd.graph.increment_version(x)  # the kernel wrote behind autograd's back
            return x
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _launch(_cpp.DROPOUT_SCALE, x, out, seed, p, group, fresh_out=True, backend=backend)
        if feature and 1 in x.shape:  # broadcast noise lets size-1 dimensions keep x's strides
            return _laid_out_as_torch(out, _torch_strides(lambda m: _dropout_expression(m, True), x))
        return out  # what torch gives a contiguous input
    source = x.contiguous()  # a copy, computed in place
    _launch(_cpp.DROPOUT_SCALE, source, source, seed, p, group, backend=backend)
    if inplace:
        return x.copy_(source)
    return _laid_out_as_torch(source, _torch_strides(lambda m: _dropout_expression(m, feature), x))


class _MaskedScale(torch.autograd.Function):
    """x * mask * scale for a given seed. Its backward is the same op on the grad (the mask is
    recomputed), itself differentiable, so higher-order grads work too. feature (optional) says
    the output takes the layout of torch's channel dropout."""

    @staticmethod
    def forward(ctx, x, seed, p, group, inplace, feature=False):
        ctx.p, ctx.group, ctx.feature = p, group, feature
        ctx.save_for_backward(seed)
        if inplace:
            ctx.mark_dirty(x)
        return _masked(x, seed, p, group, inplace, feature)

    @staticmethod
    def backward(ctx, grad):
        (seed,) = ctx.saved_tensors
        grad_x = _masked_scale(grad, seed, ctx.p, ctx.group, False, ctx.feature)
        return (grad_x,) + (None,) * (len(ctx.needs_input_grad) - 1)


def _masked_scale(x, seed, p, group, inplace, feature, backend=None):
    """_MaskedScale where autograd records a graph (training, double backward), else the bare
    kernel call: an autograd.Function costs about as much as the kernel on small tensors."""
    if x.requires_grad and torch.is_grad_enabled():
        return _MaskedScale.apply(x, seed, p, group, inplace, feature)
    return _masked(x, seed, p, group, inplace, feature, backend)


def _check_inplace(t):
    """torch's check before an in-place op, made before anything is written."""
    if torch.is_grad_enabled() and t.requires_grad:
        if t._is_view() and t._base.is_leaf:
            raise RuntimeError("a view of a leaf Variable that requires grad is being used in an in-place operation.")
        if t.is_leaf:
            raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")


def _dropout(input, p, training, inplace, generator, feature):
    """torch's _dropout_impl (aten/src/ATen/native/Dropout.cpp), step for step."""
    if not 0 <= p <= 1:  # NaN: the Python check lets it through, torch's C++ one does not
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {p}")
    if p == 0 or not training or input.numel() == 0:
        return input
    if inplace:
        _check_inplace(input)
    if p == 1:
        zero = torch.zeros((), dtype=input.dtype, device=input.device)
        return input.mul_(zero) if inplace else input.mul(zero)
    if feature and input.dim() < 2:
        raise RuntimeError("Feature dropout requires at least 2 dimensions in the input")
    backend = _backend_of(input)
    if backend is None:
        if generator is None:  # torch's own dropout
            op = {(False, False): torch.dropout, (False, True): torch.dropout_,
                  (True, False): torch.feature_dropout, (True, True): torch.feature_dropout_}[feature, inplace]
            return op(input, p, True)
        # torch's formula, which takes a generator where torch's functions do not
        shape = input.shape[:2] + (1,) * (input.dim() - 2) if feature else input.shape
        noise = input.new_empty(shape).bernoulli_(1 - p, generator=generator).div_(1 - p)
        return input.mul_(noise) if inplace else input.mul(noise)
    group = math.prod(input.shape[2:]) if feature else 1
    return _masked_scale(input, _draw_seed(input.device, generator), p, group, inplace, feature, backend)


def dropout(input, p=0.5, training=True, inplace=False, generator=None):
    """torch.nn.functional.dropout without a stored mask; ``generator`` supplies the seed."""
    if has_torch_function_unary(input):
        return handle_torch_function(dropout, (input,), input, p=p, training=training, inplace=inplace,
                                     generator=generator)
    _check_p(p)
    return _dropout(input, p, training, inplace, generator, feature=False)


def _feature_dropout(input, p, training, inplace):
    return _dropout(input, p, training, inplace, None, feature=True)


def dropout1d(input, p=0.5, training=True, inplace=False):
    """torch.nn.functional.dropout1d: whole channels dropped."""
    if has_torch_function_unary(input):
        return handle_torch_function(dropout1d, (input,), input, p=p, training=training, inplace=inplace)
    _check_p(p)
    inp_dim = input.dim()
    if inp_dim not in (2, 3):
        raise RuntimeError(
            f"dropout1d: Expected 2D or 3D input, but received a {inp_dim}D input. "
            "Note that dropout1d exists to provide channel-wise dropout on inputs with 1 "
            "spatial dimension, a channel dimension, and an optional batch dimension "
            "(i.e. 2D or 3D inputs)."
        )
    is_batched = inp_dim == 3
    if not is_batched:
        input = input.unsqueeze_(0) if inplace else input.unsqueeze(0)
    result = _feature_dropout(input, p, training, inplace)
    if not is_batched:
        result = result.squeeze_(0) if inplace else result.squeeze(0)
    return result


def dropout2d(input, p=0.5, training=True, inplace=False):
    """torch.nn.functional.dropout2d: whole channels dropped, with torch's warnings."""
    if has_torch_function_unary(input):
        return handle_torch_function(dropout2d, (input,), input, p=p, training=training, inplace=inplace)
    _check_p(p)
    inp_dim = input.dim()
    if inp_dim not in (3, 4):
        warn_msg = (
            f"dropout2d: Received a {inp_dim}-D input to dropout2d, which is deprecated "
            "and will result in an error in a future release. To retain the behavior "
            "and silence this warning, please use dropout instead. Note that dropout2d "
            "exists to provide channel-wise dropout on inputs with 2 spatial dimensions, "
            "a channel dimension, and an optional batch dimension (i.e. 3D or 4D inputs)."
        )
        warnings.warn(warn_msg, stacklevel=2)
    if inp_dim == 3:
        warnings.warn(
            "dropout2d: Received a 3D input to dropout2d and assuming that channel-wise "
            "1D dropout behavior is desired - input is interpreted as shape (N, C, L), where C "
            "is the channel dim. This behavior will change in a future release to interpret the "
            "input as one without a batch dimension, i.e. shape (C, H, W). To maintain the 1D "
            "channel-wise dropout behavior, please switch to using dropout1d instead.",
            stacklevel=2,
        )
    return _feature_dropout(input, p, training, inplace)


def dropout3d(input, p=0.5, training=True, inplace=False):
    """torch.nn.functional.dropout3d: whole channels dropped, with torch's warnings."""
    if has_torch_function_unary(input):
        return handle_torch_function(dropout3d, (input,), input, p=p, training=training, inplace=inplace)
    _check_p(p)
    inp_dim = input.dim()
    if inp_dim not in (4, 5):
        warn_msg = (
            f"dropout3d: Received a {inp_dim}-D input to dropout3d, which is deprecated "
            "and will result in an error in a future release. To retain the behavior "
            "and silence this warning, please use dropout instead. Note that dropout3d "
            "exists to provide channel-wise dropout on inputs with 3 spatial dimensions, "
            "a channel dimension, and an optional batch dimension (i.e. 4D or 5D inputs)."
        )
        warnings.warn(warn_msg, stacklevel=2)
    is_batched = inp_dim == 5
    if not is_batched:
        input = input.unsqueeze_(0) if inplace else input.unsqueeze(0)
    result = _feature_dropout(input, p, training, inplace)
    if not is_batched:
        result = result.squeeze_(0) if inplace else result.squeeze(0)
    return result


class _DropoutAdd(torch.autograd.Function):
    """residual + dropout(x + bias) in one pass; backward: the mask times the grad for x (and,
    summed, for bias), the grad itself for residual."""

    @staticmethod
    def forward(ctx, x, residual, bias, seed, p):
        ctx.p = p
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.save_for_backward(seed)
        flat_x, flat_residual = x.contiguous(), residual.contiguous()
        flat_bias = None if bias is None else bias.contiguous()
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _launch(_cpp.DROPOUT_ADD_RESIDUAL, flat_x, out, seed, p, 1, flat_residual, flat_bias, fresh_out=True)
        if flat_x is x and flat_residual is residual:
            return out  # what torch gives contiguous operands
        return _laid_out_as_torch(out, _torch_strides(
            lambda x, r, b: r + _dropout_expression(x if b is None else x + b, False), x, residual, bias))

    @staticmethod
    def backward(ctx, grad):
        (seed,) = ctx.saved_tensors
        needs_x, _, needs_bias = ctx.needs_input_grad[:3]
        grad_x = _masked_scale(grad, seed, ctx.p, 1, False, False) if needs_x or needs_bias else None
        grad_bias = grad_x.sum_to_size(ctx.bias_shape) if needs_bias else None
        return grad_x if needs_x else None, grad, grad_bias, None, None


def _fuses_with(x, residual, bias):
    """Whether residual + dropout(x + bias) runs as one kernel: plain tensors of one dtype and
    device, residual of x's shape, bias (if any) of shape x.shape[-1:]."""
    tensors = (x, residual) if bias is None else (x, residual, bias)
    if _backend_of(x) is None or x.numel() == 0 or any(type(t) not in _PLAIN_TYPES for t in tensors):
        return False
    if any(t.dtype != x.dtype or t.device != x.device for t in tensors) or residual.shape != x.shape:
        return False
    return bias is None or (x.dim() >= 1 and bias.shape == x.shape[-1:])


def dropout_add(x, residual, p=0.5, training=True, bias=None, *, generator=None):
    """``residual + dropout(x + bias, p, training)`` in one pass forward and one backward, the
    mask and rounding exactly those of the unfused expression with pyfused's dropout (each op
    rounds to the dtype, as torch's do); bias is optional. Where the shapes, dtypes or devices
    differ (broadcasting, type promotion), the unfused expression runs."""
    _check_p(p)
    if not training or p == 0 or p == 1 or not _fuses_with(x, residual, bias):
        return residual + dropout(x if bias is None else x + bias, p, training, generator=generator)
    return _DropoutAdd.apply(x, residual, bias, _draw_seed(x.device, generator), p)


class Dropout(torch.nn.Dropout):
    """torch.nn.Dropout, with pyfused's dropout."""

    def forward(self, input):
        return dropout(input, self.p, self.training, self.inplace)


class Dropout1d(torch.nn.Dropout1d):
    """torch.nn.Dropout1d, with pyfused's dropout1d."""

    def forward(self, input):
        return dropout1d(input, self.p, self.training, self.inplace)


class Dropout2d(torch.nn.Dropout2d):
    """torch.nn.Dropout2d, with pyfused's dropout2d."""

    def forward(self, input):
        return dropout2d(input, self.p, self.training, self.inplace)


class Dropout3d(torch.nn.Dropout3d):
    """torch.nn.Dropout3d, with pyfused's dropout3d."""

    def forward(self, input):
        return dropout3d(input, self.p, self.training, self.inplace)
