// The optimizers' math: one update per optimizer, one element at a time, in opmath.
//
// Each update follows torch's for-loop implementation (torch/optim/*.py, foreach=False) op by op:
// the same scalars, computed in double on the host and rounded once to opmath, and the same order
// of operations inside each torch op (lerp, addcmul: self + value * t1 * t2, addcdiv:
// self + value * t1 / t2). Each Hyper lists its fields in the order the Python class sends them.
#pragma once

#include <cmath>
#include <cstdint>

#include "multi_tensor.h"

namespace pyfused {
namespace PYFUSED_ISA {

// torch.lerp's formula, which keeps the result exact at either end.
template <class Op>
inline Op lerp(Op self, Op end, Op weight, bool small_weight) {
  return small_weight ? self + weight * (end - self) : end - (end - self) * (Op(1) - weight);
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
      if constexpr (kL2) grad = grad + weight_decay * param;
      if constexpr (kMomentum) {
        Op& buf = v[kMomentumBuffer];
        // torch starts the buffer as a copy of the first gradient, without dampening.
        buf = s.fresh != Op(0) ? grad : buf * momentum + grad_weight * grad;
        grad = kNesterov ? grad + momentum * buf : buf;
      }
      param = param + neg_lr * grad;
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
      if constexpr (kL2) grad = grad + weight_decay * param;
      v[kSum] = v[kSum] + grad * grad;
      param = param + s.neg_clr * grad / (std::sqrt(v[kSum]) + eps);
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
        : neg_lr(Op(-h.lr)), alpha(Op(h.alpha)), one_minus_alpha(Op(1 - h.alpha)),
          small_weight(std::abs(1 - h.alpha) < 0.5), eps(Op(h.eps)),
          weight_decay(Op(h.weight_decay)), momentum(Op(h.momentum)),
          grad_sign(h.maximize != 0 ? Op(-1) : Op(1)) {}

    Scalars scalars(double, int64_t) const { return {}; }

    void operator()(Op* v, const Scalars&) const {
      Op& param = v[kParam];
      Op grad = v[kGrad] * grad_sign;
      if constexpr (kL2) grad = grad + weight_decay * param;
      Op& square_avg = v[kSquareAvg];
      square_avg = square_avg * alpha + one_minus_alpha * grad * grad;
      Op avg;
      if constexpr (kCentered) {
        Op& grad_avg = v[kGradAvg];
        grad_avg = lerp(grad_avg, grad, one_minus_alpha, small_weight);
        avg = std::sqrt(square_avg + Op(-1) * grad_avg * grad_avg);
      } else {
        avg = std::sqrt(square_avg);
      }
      avg = avg + eps;
      if constexpr (kMomentum) {
        Op& buf = v[kMomentumBuffer];
        buf = buf * momentum + grad / avg;
        param = param + neg_lr * buf;
      } else {
        param = param + neg_lr * grad / avg;
      }
    }

    Op neg_lr, alpha, one_minus_alpha;
    bool small_weight;
    Op eps, weight_decay, momentum, grad_sign;
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
        : h(h), one_minus_beta1(Op(1 - h.beta1)), small_weight(std::abs(1 - h.beta1) < 0.5),
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
      if constexpr (kL2) grad = grad + weight_decay * param;
      param = param * param_decay;
      Op& exp_avg = v[kExpAvg];
      Op& exp_avg_sq = v[kExpAvgSq];
      exp_avg = lerp(exp_avg, grad, one_minus_beta1, small_weight);
      exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad;
      Op second_moment = exp_avg_sq;
      if constexpr (kAmsgrad) {
        v[kMaxExpAvgSq] = maximum(v[kMaxExpAvgSq], exp_avg_sq);
        second_moment = v[kMaxExpAvgSq];
      }
      Op denom = std::sqrt(second_moment) / s.bias_correction2_sqrt + eps;
      param = param + s.neg_step_size * exp_avg / denom;
    }

    Hyper h;
    Op one_minus_beta1;
    bool small_weight;
    Op beta2, one_minus_beta2, eps, weight_decay, param_decay, grad_sign;
  };

  template <class T, class Run>
  static void with_update(const Hyper& h, Run&& run) {
    with_flags([&](auto amsgrad, auto l2) { run(Update<OpMath<T>, amsgrad, l2>(h)); },
               h.amsgrad != 0, h.weight_decay != 0 && h.decoupled == 0);
  }
};

}  // namespace PYFUSED_ISA
}  // namespace pyfused
