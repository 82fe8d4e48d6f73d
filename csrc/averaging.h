// Weight averaging (pyfused/optim/swa_utils.py): one pass of the multi-tensor driver
// (csrc/multi_tensor.h) over an AveragedModel's tensors of one dtype per update_parameters.
// Role 0 is the average (written), role 1 the model's tensor (read: the driver's grad role, whose
// multiplier of 1 changes no value). Each op rounds as the torch code it replaces:
//   kLerp    avg.lerp_(model, w), as torch._foreach_lerp_ in get_ema_multi_avg_fn and
//            get_swa_multi_avg_fn (and AveragedModel's default on CUDA): csrc/optimizers.h's lerp;
//   kDivide  avg + (model - avg) / d, every op rounded to the storage type as torch's tensor ops
//            round it: get_swa_avg_fn, AveragedModel's default on CPU (no foreach kernels there).
#pragma once

#include "dropout.h"  // rounded
#include "kernels.h"
#include "optimizers.h"  // lerp

namespace pyfused {
namespace PYFUSED_ISA {

template <class T, AverageOp kOp>
struct AverageUpdate {
  using Op = OpMath<T>;
  static constexpr int kRoles = 2;
  static constexpr unsigned kWrites = 0b01u;
  static constexpr bool kCountsSteps = false;
  struct Scalars {};
  static constexpr int kScalars = 0;

  Scalars scalars(double, int64_t) const { return {}; }

  void operator()(Op* v, const Scalars&) const {
    if constexpr (kOp == AverageOp::kLerp) {
      v[0] = lerp(v[0], v[1], scalar);
    } else {
      v[0] = v[0] + rounded<T>(rounded<T>(v[1] - v[0]) / scalar);
    }
  }

  Op scalar;  // the weight, or the divisor
};

template <class T>
void average_for_type(AverageOp op, const TensorTable& table, double scalar) {
  if (op == AverageOp::kLerp) {
    multi_tensor_apply<T>(AverageUpdate<T, AverageOp::kLerp>{OpMath<T>(scalar)}, table);
  } else {
    multi_tensor_apply<T>(AverageUpdate<T, AverageOp::kDivide>{OpMath<T>(scalar)}, table);
  }
}

}  // namespace PYFUSED_ISA
}  // namespace pyfused
