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

// A one-group family for the driver: its Hyper is the weight, or the divisor.
template <AverageOp kOp>
struct Averaging {
  struct Hyper { double scalar; };

  template <class T>
  struct Update {
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

    Op scalar;
  };

  template <class T, class Run>
  static void with_update(const Hyper& h, Run&& run) { run(Update<T>{OpMath<T>(h.scalar)}); }
};

template <class T>
void average_for_type(AverageOp op, const TensorTable& table, double scalar) {
  TensorTable one_group = table;
  const int64_t ends[1] = {table.n_tensors};
  one_group.n_groups = 1;
  one_group.group_ends = ends;
  if (op == AverageOp::kLerp) {
    multi_tensor_apply<Averaging<AverageOp::kLerp>, T>(one_group, &scalar);
  } else {
    multi_tensor_apply<Averaging<AverageOp::kDivide>, T>(one_group, &scalar);
  }
}

}  // namespace PYFUSED_ISA
}  // namespace pyfused
