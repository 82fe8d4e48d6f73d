"""The optimizers' math for CUDA tensors: one @triton.jit update per optimizer.

Each mirrors its twin in csrc/optimizers.h op for op, so the backends agree bit for bit with the
C++ build for CPUs with FMA (avx2, avx512): the same scalars (derived in float64, then rounded
once to opmath), the same operation order, IEEE division and square root (div_rn, sqrt_rn; a
plain `/` compiles to an approximate division), and one fused multiply-add exactly where torch's
CPU kernels use one (_mul_add: add with alpha, addcmul, lerp); the launcher turns every other
fusion off. torch's own CUDA kernels are compiled by nvcc, which contracts a * b + c wherever it
finds one, so they may fuse where these kernels round twice.

An update gets blocks of param, grad and up to three state tensors, already in opmath, plus
`hyper` (the optimizer's Hyper from csrc/optimizers.h, as float64, same field order) and
`scalars` (the tensor's per-tensor scalars, computed on the host by the C++ module). It returns
the new param and states. Only the flags that change the state layout (AMSGRAD, MOMENTUM,
CENTERED) are compile-time, chosen by mode() below; the others (weight decay on or off, Nesterov)
are read from `hyper` like every hyperparameter, so the param groups of one launch may differ in
them and a scheduler never recompiles a kernel. Where a C++ Update skips an op at compile time,
these select the op's input instead (tl.where), which gives the same bits.
"""

import triton
import triton.language as tl


@triton.jit
def _div(a, b, OP: tl.constexpr):
    # IEEE division: div_rn for float32 (a plain `/` is approximate there); float64's is exact.
    if OP == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(x, OP: tl.constexpr):
    if OP == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def _mul_add(a, b, c):
    # a * b + c rounded once, where torch's CPU kernels fuse it (mul_add in csrc/optimizers.h).
    return tl.fma(a, b, c)


@triton.jit
def _lerp(start, end, weight):
    # torch.lerp's formulas, which keep the result exact at either end: one fma either way.
    small = tl.abs(weight) < 0.5
    return _mul_add(tl.where(small, weight, weight - 1.0), end - start, tl.where(small, start, end))


@triton.jit
def _maximum(a, b):
    # torch.maximum: NaN wins.
    return tl.where((a > b) | (a != a), a, b)


@triton.jit
def _grad_sign(maximize, OP: tl.constexpr):
    return tl.where(maximize != 0.0, -1.0, 1.0).to(OP)


@triton.jit
def _weight_decay(param, grad, weight_decay, OP: tl.constexpr):
    # grad.add(param, alpha=weight_decay), as torch does only when weight_decay != 0.
    return tl.where(weight_decay != 0.0, _mul_add(param, weight_decay.to(OP), grad), grad)


@triton.jit
def sgd(param, grad, buf, unused1, unused2, hyper, scalars, OP: tl.constexpr, MOMENTUM: tl.constexpr):
    # Hyper: lr, momentum, dampening, weight_decay, nesterov, maximize. Scalars: fresh.
    lr = tl.load(hyper + 0).to(tl.float64, bitcast=True)
    momentum = tl.load(hyper + 1).to(tl.float64, bitcast=True)
    dampening = tl.load(hyper + 2).to(tl.float64, bitcast=True)
    weight_decay = tl.load(hyper + 3).to(tl.float64, bitcast=True)
    nesterov = tl.load(hyper + 4).to(tl.float64, bitcast=True)
    maximize = tl.load(hyper + 5).to(tl.float64, bitcast=True)
    grad = grad * _grad_sign(maximize, OP)
    grad = _weight_decay(param, grad, weight_decay, OP)
    if MOMENTUM:
        fresh = tl.load(scalars + 0).to(tl.float64, bitcast=True)
        # torch starts the buffer as a copy of the first gradient, without dampening.
        buf = tl.where(fresh != 0.0, grad, _mul_add(grad, (1.0 - dampening).to(OP), buf * momentum.to(OP)))
        grad = tl.where(nesterov != 0.0, _mul_add(buf, momentum.to(OP), grad), buf)
    param = _mul_add(grad, (-lr).to(OP), param)
    return param, buf, unused1, unused2


@triton.jit
def adagrad(param, grad, state_sum, unused1, unused2, hyper, scalars, OP: tl.constexpr):
    # Hyper: lr, lr_decay, weight_decay, eps, maximize. Scalars: -clr.
    weight_decay = tl.load(hyper + 2).to(tl.float64, bitcast=True)
    eps = tl.load(hyper + 3).to(tl.float64, bitcast=True)
    maximize = tl.load(hyper + 4).to(tl.float64, bitcast=True)
    neg_clr = tl.load(scalars + 0).to(tl.float64, bitcast=True).to(OP)
    grad = grad * _grad_sign(maximize, OP)
    grad = _weight_decay(param, grad, weight_decay, OP)
    state_sum = _mul_add(grad, grad, state_sum)
    param = param + _div(neg_clr * grad, _sqrt(state_sum, OP) + eps.to(OP), OP)
    return param, state_sum, unused1, unused2


@triton.jit
def rmsprop(param, grad, square_avg, second, third, hyper, scalars, OP: tl.constexpr,
            MOMENTUM: tl.constexpr, CENTERED: tl.constexpr):
    # Hyper: lr, alpha, eps, weight_decay, momentum, centered, maximize. No scalars.
    # States: square_avg, then momentum_buffer if MOMENTUM, then grad_avg if CENTERED.
    lr = tl.load(hyper + 0).to(tl.float64, bitcast=True)
    alpha = tl.load(hyper + 1).to(tl.float64, bitcast=True)
    eps = tl.load(hyper + 2).to(tl.float64, bitcast=True)
    weight_decay = tl.load(hyper + 3).to(tl.float64, bitcast=True)
    momentum = tl.load(hyper + 4).to(tl.float64, bitcast=True)
    maximize = tl.load(hyper + 6).to(tl.float64, bitcast=True)
    grad = grad * _grad_sign(maximize, OP)
    grad = _weight_decay(param, grad, weight_decay, OP)
    square_avg = _mul_add((1.0 - alpha).to(OP) * grad, grad, square_avg * alpha.to(OP))
    if MOMENTUM:
        buf = second
        grad_avg = third
    else:
        buf = third
        grad_avg = second
    if CENTERED:
        grad_avg = _lerp(grad_avg, grad, (1.0 - alpha).to(OP))
        avg = _sqrt(_mul_add(-grad_avg, grad_avg, square_avg), OP)
    else:
        avg = _sqrt(square_avg, OP)
    avg = avg + eps.to(OP)
    if MOMENTUM:
        buf = buf * momentum.to(OP) + _div(grad, avg, OP)
        param = _mul_add(buf, (-lr).to(OP), param)
        second = buf
        third = grad_avg
    else:
        param = param + _div((-lr).to(OP) * grad, avg, OP)
        second = grad_avg
        third = buf
    return param, square_avg, second, third


@triton.jit
def adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, hyper, scalars, OP: tl.constexpr,
         AMSGRAD: tl.constexpr):
    # Hyper: lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled.
    # Scalars: -lr / bias_correction1, sqrt(bias_correction2).
    lr = tl.load(hyper + 0).to(tl.float64, bitcast=True)
    beta1 = tl.load(hyper + 1).to(tl.float64, bitcast=True)
    beta2 = tl.load(hyper + 2).to(tl.float64, bitcast=True)
    eps = tl.load(hyper + 3).to(tl.float64, bitcast=True)
    weight_decay = tl.load(hyper + 4).to(tl.float64, bitcast=True)
    maximize = tl.load(hyper + 6).to(tl.float64, bitcast=True)
    decoupled = tl.load(hyper + 7).to(tl.float64, bitcast=True)
    neg_step_size = tl.load(scalars + 0).to(tl.float64, bitcast=True).to(OP)
    bias_correction2_sqrt = tl.load(scalars + 1).to(tl.float64, bitcast=True).to(OP)
    param_decay = tl.where(decoupled != 0.0, 1.0 - lr * weight_decay, 1.0).to(OP)

    grad = grad * _grad_sign(maximize, OP)
    grad = _weight_decay(param, grad, tl.where(decoupled != 0.0, 0.0, weight_decay), OP)
    param = param * param_decay
    exp_avg = _lerp(exp_avg, grad, (1.0 - beta1).to(OP))
    exp_avg_sq = _mul_add((1.0 - beta2).to(OP) * grad, grad, exp_avg_sq * beta2.to(OP))
    second_moment = exp_avg_sq
    if AMSGRAD:
        max_exp_avg_sq = _maximum(max_exp_avg_sq, exp_avg_sq)
        second_moment = max_exp_avg_sq
    denom = _div(_sqrt(second_moment, OP), bias_correction2_sqrt, OP) + eps.to(OP)
    param = param + _div(neg_step_size * exp_avg, denom, OP)
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


@triton.jit
def adadelta(param, grad, square_avg, acc_delta, unused, hyper, scalars, OP: tl.constexpr):
    # Hyper: lr, rho, eps, weight_decay, maximize. No scalars.
    lr = tl.load(hyper + 0).to(tl.float64, bitcast=True)
    rho = tl.load(hyper + 1).to(tl.float64, bitcast=True)
    eps = tl.load(hyper + 2).to(tl.float64, bitcast=True)
    weight_decay = tl.load(hyper + 3).to(tl.float64, bitcast=True)
    maximize = tl.load(hyper + 4).to(tl.float64, bitcast=True)
    grad = grad * _grad_sign(maximize, OP)
    grad = _weight_decay(param, grad, weight_decay, OP)
    square_avg = _mul_add((1.0 - rho).to(OP) * grad, grad, square_avg * rho.to(OP))
    std = _sqrt(square_avg + eps.to(OP), OP)
    delta = _div(_sqrt(acc_delta + eps.to(OP), OP), std, OP) * grad
    acc_delta = _mul_add((1.0 - rho).to(OP) * delta, delta, acc_delta * rho.to(OP))
    param = _mul_add(delta, (-lr).to(OP), param)
    return param, square_avg, acc_delta, unused


@triton.jit
def _pow(base, exponent):
    return tl.exp2(exponent * tl.log2(base))


@triton.jit
def tensor_scalars(OPTIMIZER: tl.constexpr, step, lr, hyper):
    """Per-tensor scalars from a step count held on the device, for capturable=True (the
    non-capturable path gets them from the host: the scalars() of each Update in
    csrc/optimizers.h, whose formulas these repeat in float64; pow here is exp2(e log2 b), which
    can differ from the host's pow in the last bits). Returns up to two; unused ones are 0."""
    zero = tl.zeros_like(step)
    if OPTIMIZER == 1:  # Adagrad: -lr / (1 + (step - 1) * lr_decay)
        lr_decay = tl.load(hyper + 1).to(tl.float64, bitcast=True)
        return -(lr / (1.0 + (step - 1.0) * lr_decay)), zero
    elif OPTIMIZER == 3:  # Adam: -lr / bias_correction1, sqrt(bias_correction2)
        beta1 = tl.load(hyper + 1).to(tl.float64, bitcast=True)
        beta2 = tl.load(hyper + 2).to(tl.float64, bitcast=True)
        bias_correction1 = 1.0 - _pow(beta1 + zero, step)
        bias_correction2 = 1.0 - _pow(beta2 + zero, step)
        return -(lr / bias_correction1), tl.sqrt(bias_correction2)
    else:  # SGD (never capturable in torch), RMSprop and Adadelta have none
        return zero, zero


def mode(kernel: str, hyper: tuple) -> dict:
    """The compile-time flags for a launch, from one param group's Hyper values (as in each
    with_update in C++): only those that change the state layout, which a launch's groups share."""
    if kernel == "sgd":
        return dict(MOMENTUM=hyper[1] != 0)
    if kernel == "rmsprop":
        lr, alpha, eps, weight_decay, momentum, centered, maximize = hyper
        return dict(MOMENTUM=momentum > 0, CENTERED=centered != 0)
    if kernel == "adam":
        return dict(AMSGRAD=hyper[5] != 0)
    if kernel in ("adagrad", "adadelta"):
        return {}
    raise ValueError(f"unknown optimizer kernel {kernel!r}")
