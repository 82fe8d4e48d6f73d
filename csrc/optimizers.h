// The optimizers' math: one update per optimizer, one element at a time, in opmath.
//
// Each update follows torch's for-loop implementation (torch/optim/*.py, foreach=False) op by op:
// the same scalars, computed in double on the host and rounded once to opmath, the same order of
// operations inside each torch op, and the same roundings as torch's CPU kernels (measured on
// torch 2.13, in their vector body and scalar tail alike):
//   a.add(b, alpha=s)              fma(b, s, a)
//   self.addcmul(t1, t2, value=s)  fma(s * t1, t2, self)
//   self.lerp(end, w)              fma(w, end - self, self), or fma(w - 1, end - self, end) for w >= 0.5
//   self.addcdiv(t1, t2, value=s)  self + s * t1 / t2, each op rounded (as are mul and add without alpha)
// where the CPU has FMA (torch's avx2 and avx512 capabilities); without it (its default capability)
// every op rounds. mul_add below is that one step. sqrt is correctly rounded here; torch's CPU sqrt
// is not (about 0.6% of fp32 results 1 ulp off), the one place where the updates knowingly differ.
// Each Hyper lists its fields in the order the Python class sends them.
#pragma once

#include <cmath>
#include <cstdint>

#include "multi_tensor.h"

namespace pyfused {
namespace PYFUSED_ISA {

// Whether this instruction-set build (csrc/isa_*.cpp, named by PYFUSED_ISA) targets FMA hardware.
#define PYFUSED_FMA_baseline 0
#define PYFUSED_FMA_avx2 1
#define PYFUSED_FMA_avx512 1
#define PYFUSED_CONCAT_(a, b) a##b
#define PYFUSED_CONCAT(a, b) PYFUSED_CONCAT_(a, b)
constexpr bool kFusedMultiplyAdd = PYFUSED_CONCAT(PYFUSED_FMA_, PYFUSED_ISA);

// a * b + c where torch's CPU kernels fuse it: rounded once in the avx2 and avx512 builds (std::fma
// compiles to vfmadd there, in the vector body and the scalar tail), and twice in the baseline
// build, like torch's default capability: its CPUs may lack FMA, and a software fma in the loop
// would be many times slower. -ffp-contract=off keeps the compiler from fusing anything else.
template <class Op>
inline Op mul_add(Op a, Op b, Op c) {
  if constexpr (kFusedMultiplyAdd) {
    return std::fma(a, b, c);
  } else {
    return a * b + c;
  }
}

// torch.lerp's formulas, which keep the result exact at either end. Written like torch's vectorized
// lerp, one mul_add of operands selected by comparing the weight: a branch, or a select on a bool,
// keeps GCC from vectorizing the loop.
template <class Op>
inline Op lerp(Op self, Op end, Op weight) {
  bool small = std::abs(weight) < Op(0.5);
  return mul_add(small ? weight : weight - Op(1), end - self, small ? self : end);
}

// torch.maximum: NaN wins.
template <class Op>
inline Op maximum(Op a, Op b) { return (a > b || a != a) ? a : b; }

struct Sgd {
  struct Hyper { double lr, momentum, dampening, weight_decay, nesterov, maximize; };
  enum : int64_t { kFreshBuffer = 1 };  // per-tensor flag: the momentum buffer was just created

  template <class Op, bool kMomentum, bool kNesterov, bool kL2>
  struct Update {
    enum { kParam, kGrad, kMomentumBuffer };
    static constexpr int kRoles = kMomentum ? 3 : 2;
    static constexpr unsigned kWrites = kMomentum ? 0b101u : 0b01u;
    static constexpr bool kCountsSteps = false;
    struct Scalars { Op fresh; };  // 1 or 0
    static constexpr int kScalars = 1;

    explicit Update(const Hyper& h)
        : neg_lr(Op(-h.lr)), momentum(Op(h.momentum)), grad_weight(Op(1 - h.dampening)),
          weight_decay(Op(h.weight_decay)), grad_sign(h.maximize != 0 ? Op(-1) : Op(1)) {}

    Scalars scalars(double, int64_t flags) const { return {Op((flags & kFreshBuffer) != 0)}; }

    void operator()(Op* v, const Scalars& s) const {
      Op& param = v[kParam];
      Op grad = v[kGrad] * grad_sign;
      if constexpr (kL2) grad = mul_add(param, weight_decay, grad);  // grad.add(param, alpha=weight_decay)
      if constexpr (kMomentum) {
        Op& buf = v[kMomentumBuffer];
        // torch starts the buffer as a copy of the first gradient, without dampening;
        // then buf.mul_(momentum).add_(grad, alpha=1 - dampening).
        buf = s.fresh != Op(0) ? grad : mul_add(grad, grad_weight, buf * momentum);
        grad = kNesterov ? mul_add(buf, momentum, grad) : buf;  // grad.add(buf, alpha=momentum)
      }
      param = mul_add(grad, neg_lr, param);  // param.add_(grad, alpha=-lr)
    }

    Op neg_lr, momentum, grad_weight, weight_decay, grad_sign;
  };

  template <class T, class Run>
  static void with_update(const Hyper& h, Run&& run) {
    // Like torch, Nesterov does nothing without momentum (a param group edited after construction).
    bool momentum = h.momentum != 0;
    with_flags([&](auto momentum, auto nesterov, auto l2) {
      if constexpr (momentum || !nesterov) run(Update<OpMath<T>, momentum, nesterov, l2>(h));
    }, momentum, momentum && h.nesterov != 0, h.weight_decay != 0);
  }
};

struct Adagrad {
  struct Hyper { double lr, lr_decay, weight_decay, eps, maximize; };

  template <class Op, bool kL2>
  struct Update {
    enum { kParam, kGrad, kSum };
    static constexpr int kRoles = 3;
    static constexpr unsigned kWrites = 0b101u;
    static constexpr bool kCountsSteps = true;
    struct Scalars { Op neg_clr; };
    static constexpr int kScalars = 1;

    explicit Update(const Hyper& h)
        : h(h), weight_decay(Op(h.weight_decay)), eps(Op(h.eps)),
          grad_sign(h.maximize != 0 ? Op(-1) : Op(1)) {}

    Scalars scalars(double step, int64_t) const {
      return {Op(-(h.lr / (1 + (step - 1) * h.lr_decay)))};
    }

    void operator()(Op* v, const Scalars& s) const {
      Op& param = v[kParam];
      Op grad = v[kGrad] * grad_sign;
      if constexpr (kL2) grad = mul_add(param, weight_decay, grad);  // grad.add(param, alpha=weight_decay)
      v[kSum] = mul_add(grad, grad, v[kSum]);  // state_sum.addcmul_(grad, grad, value=1)
      param = param + s.neg_clr * grad / (std::sqrt(v[kSum]) + eps);  // param.addcdiv_(grad, std, value=-clr)
    }

    Hyper h;
    Op weight_decay, eps, grad_sign;
  };

  template <class T, class Run>
  static void with_update(const Hyper& h, Run&& run) {
    with_flags([&](auto l2) { run(Update<OpMath<T>, l2>(h)); }, h.weight_decay != 0);
  }
};

struct Rmsprop {
  struct Hyper { double lr, alpha, eps, weight_decay, momentum, centered, maximize; };

  template <class Op, bool kL2, bool kMomentum, bool kCentered>
  struct Update {
    enum { kParam, kGrad, kSquareAvg, kMomentumBuffer = kMomentum ? 3 : -1,
           kGradAvg = kMomentum ? 4 : 3 };
    static constexpr int kRoles = 3 + kMomentum + kCentered;
    static constexpr unsigned kWrites = ((1u << kRoles) - 1) & ~(1u << kGrad);
    static constexpr bool kCountsSteps = true;
    struct Scalars {};
    static constexpr int kScalars = 0;

    explicit Update(const Hyper& h)
        : neg_lr(Op(-h.lr)), alpha(Op(h.alpha)), one_minus_alpha(Op(1 - h.alpha)), eps(Op(h.eps)),
          weight_decay(Op(h.weight_decay)), momentum(Op(h.momentum)),
          grad_sign(h.maximize != 0 ? Op(-1) : Op(1)) {}

    Scalars scalars(double, int64_t) const { return {}; }

    void operator()(Op* v, const Scalars&) const {
      Op& param = v[kParam];
      Op grad = v[kGrad] * grad_sign;
      if constexpr (kL2) grad = mul_add(param, weight_decay, grad);  // grad.add(param, alpha=weight_decay)
      Op& square_avg = v[kSquareAvg];
      // square_avg.mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
      square_avg = mul_add(one_minus_alpha * grad, grad, square_avg * alpha);
      Op avg;
      if constexpr (kCentered) {
        Op& grad_avg = v[kGradAvg];
        grad_avg = lerp(grad_avg, grad, one_minus_alpha);
        // square_avg.addcmul(grad_avg, grad_avg, value=-1).sqrt_()
        avg = std::sqrt(mul_add(-grad_avg, grad_avg, square_avg));
      } else {
        avg = std::sqrt(square_avg);
      }
      avg = avg + eps;
      if constexpr (kMomentum) {
        Op& buf = v[kMomentumBuffer];
        buf = buf * momentum + grad / avg;  // buf.mul_(momentum).addcdiv_(grad, avg)
        param = mul_add(buf, neg_lr, param);  // param.add_(buf, alpha=-lr)
      } else {
        param = param + neg_lr * grad / avg;  // param.addcdiv_(grad, avg, value=-lr)
      }
    }

    Op neg_lr, alpha, one_minus_alpha, eps, weight_decay, momentum, grad_sign;
  };

  template <class T, class Run>
  static void with_update(const Hyper& h, Run&& run) {
    with_flags([&](auto l2, auto momentum, auto centered) {
      run(Update<OpMath<T>, l2, momentum, centered>(h));
    }, h.weight_decay != 0, h.momentum > 0, h.centered != 0);
  }
};

// Adam and AdamW: AdamW is Adam with decoupled weight decay, as in torch.
struct Adam {
  struct Hyper { double lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled; };

  template <class Op, bool kAmsgrad, bool kL2>
  struct Update {
    enum { kParam, kGrad, kExpAvg, kExpAvgSq, kMaxExpAvgSq };
    static constexpr int kRoles = kAmsgrad ? 5 : 4;
    static constexpr unsigned kWrites = ((1u << kRoles) - 1) & ~(1u << kGrad);
    static constexpr bool kCountsSteps = true;
    struct Scalars { Op neg_step_size, bias_correction2_sqrt; };
    static constexpr int kScalars = 2;

    explicit Update(const Hyper& h)
        : h(h), one_minus_beta1(Op(1 - h.beta1)),
          beta2(Op(h.beta2)), one_minus_beta2(Op(1 - h.beta2)), eps(Op(h.eps)),
          weight_decay(Op(h.weight_decay)),
          param_decay(h.decoupled != 0 ? Op(1 - h.lr * h.weight_decay) : Op(1)),
          grad_sign(h.maximize != 0 ? Op(-1) : Op(1)) {}

    Scalars scalars(double step, int64_t) const {
      double bias_correction1 = 1 - std::pow(h.beta1, step);
      double bias_correction2 = 1 - std::pow(h.beta2, step);
      return {Op(-(h.lr / bias_correction1)), Op(std::pow(bias_correction2, 0.5))};
    }

    void operator()(Op* v, const Scalars& s) const {
      Op& param = v[kParam];
      Op grad = v[kGrad] * grad_sign;
      if constexpr (kL2) grad = mul_add(param, weight_decay, grad);  // grad.add(param, alpha=weight_decay)
      param = param * param_decay;  // param.mul_(1 - lr * weight_decay)
      Op& exp_avg = v[kExpAvg];
      Op& exp_avg_sq = v[kExpAvgSq];
      exp_avg = lerp(exp_avg, grad, one_minus_beta1);
      // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
      exp_avg_sq = mul_add(one_minus_beta2 * grad, grad, exp_avg_sq * beta2);
      Op second_moment = exp_avg_sq;
      if constexpr (kAmsgrad) {
        v[kMaxExpAvgSq] = maximum(v[kMaxExpAvgSq], exp_avg_sq);
        second_moment = v[kMaxExpAvgSq];
      }
      Op denom = std::sqrt(second_moment) / s.bias_correction2_sqrt + eps;
      param = param + s.neg_step_size * exp_avg / denom;  // param.addcdiv_(exp_avg, denom, value=-step_size)
    }

    Hyper h;
    Op one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, param_decay, grad_sign;
  };

  template <class T, class Run>
  static void with_update(const Hyper& h, Run&& run) {
    with_flags([&](auto amsgrad, auto l2) { run(Update<OpMath<T>, amsgrad, l2>(h)); },
               h.amsgrad != 0, h.weight_decay != 0 && h.decoupled == 0);
  }
};

struct Adadelta {
  struct Hyper { double lr, rho, eps, weight_decay, maximize; };

  template <class Op, bool kL2>
  struct Update {
    enum { kParam, kGrad, kSquareAvg, kAccDelta };
    static constexpr int kRoles = 4;
    static constexpr unsigned kWrites = 0b1101u;
    static constexpr bool kCountsSteps = true;
    struct Scalars {};
    static constexpr int kScalars = 0;

    explicit Update(const Hyper& h)
        : neg_lr(Op(-h.lr)), rho(Op(h.rho)), one_minus_rho(Op(1 - h.rho)), eps(Op(h.eps)),
          weight_decay(Op(h.weight_decay)), grad_sign(h.maximize != 0 ? Op(-1) : Op(1)) {}

    Scalars scalars(double, int64_t) const { return {}; }

    void operator()(Op* v, const Scalars&) const {
      Op& param = v[kParam];
      Op grad = v[kGrad] * grad_sign;
      if constexpr (kL2) grad = mul_add(param, weight_decay, grad);  // grad.add(param, alpha=weight_decay)
      Op& square_avg = v[kSquareAvg];
      Op& acc_delta = v[kAccDelta];
      // square_avg.mul_(rho).addcmul_(grad, grad, value=1 - rho)
      square_avg = mul_add(one_minus_rho * grad, grad, square_avg * rho);
      Op std_ = std::sqrt(square_avg + eps);  // square_avg.add(eps).sqrt_()
      // acc_delta.add(eps).sqrt_().div_(std).mul_(grad)
      Op delta = std::sqrt(acc_delta + eps) / std_ * grad;
      // acc_delta.mul_(rho).addcmul_(delta, delta, value=1 - rho)
      acc_delta = mul_add(one_minus_rho * delta, delta, acc_delta * rho);
      param = mul_add(delta, neg_lr, param);  // param.add_(delta, alpha=-lr)
    }

    Op neg_lr, rho, one_minus_rho, eps, weight_decay, grad_sign;
  };

  template <class T, class Run>
  static void with_update(const Hyper& h, Run&& run) {
    with_flags([&](auto l2) { run(Update<OpMath<T>, l2>(h)); }, h.weight_decay != 0);
  }
};

}  // namespace PYFUSED_ISA
}  // namespace pyfused
