// What the instruction-set builds (isa_*.cpp) share with the Python binding (module.cpp).
#pragma once

#include <cstdint>

namespace pyfused {

// Values must match pyfused/_cpp.py.
enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
enum class Optimizer : int { kSgd = 0, kAdagrad = 1, kRmsprop = 2, kAdam = 3, kAdadelta = 4 };

// What Python hands over for one (param group, dtype): addresses[role * n_tensors + i] is the
// address of tensor i's data in that role; steps and flags are optional per-tensor rows.
struct TensorTable {
  int64_t n_tensors;
  const int64_t* numels;
  const int64_t* addresses;
  const int64_t* steps;  // address of each tensor's step counter, a float or double scalar
  bool steps_are_double;
  const int64_t* flags;
  int threads;
  // Each grad is multiplied by grad_multiplier (a clip coefficient) before the update. With
  // store_grads it is first divided by grad_divisor (GradScaler's scale) and stored back.
  double grad_divisor = 1;
  double grad_multiplier = 1;
  bool store_grads = false;
  // Optimizer calls: param group g holds tensors [group_ends[g - 1], group_ends[g]) (from 0), and
  // the call's hyperparameters are each group's in turn.
  int64_t n_groups = 1;
  const int64_t* group_ends = nullptr;
  // Optimizer calls with step statistics: [4][n_tensors] doubles written (csrc/multi_tensor.h).
  double* stats = nullptr;
  // Optimizer calls that also update a weight average (average= in pyfused/optim/_fused.py):
  // averages[i] is the address of tensor i's average, lerped towards the new param as stored,
  // by average_weight, after the update (csrc/multi_tensor.h).
  const int64_t* averages = nullptr;
  double average_weight = 0;
};

// Batch normalization (csrc/batchnorm.h): a tensor as (outer, channels, inner), element
// (o, c, i) at (o * channels + c) * inner + i; per-channel values are double arrays.
struct BnShape {
  int64_t outer, channels, inner;
  int threads;
};

struct BnFinalize {
  int64_t channels, groups;  // groups: sets of per-channel statistics to merge; 0 in eval mode
  const double* counts;      // [groups]
  const double* means;       // [groups][channels]
  const double* m2s;         // [groups][channels]
  const void* weight;        // the parameter dtype's storage, or null
  const void* bias;
  void* running_mean;        // updated in place when groups > 0, read when groups == 0; or null
  void* running_var;
  double momentum, eps;
  double* save_mean;         // outputs, [channels] each
  double* save_invstd;
  double* scale;
  double* shift;
};

struct BnBackwardFinalize {
  int64_t channels;
  double count;
  bool training;
  const double* sum_dy;
  const double* sum_dy_xmu;
  const double* mean;
  const double* invstd;
  const void* weight;        // the parameter dtype's storage, or null
  const void* bias;
  void* dweight;             // written when not null
  void* dbias;
  double* coefficients;      // [6][channels]: mean, gm, k, g, scale, shift
};

// One dropout call (csrc/dropout.h): kScale writes x * mask * scale to out (which may be x);
// kAddResidual writes residual + dropout(x + bias), bias (optional) along the last dimension.
enum class DropoutOp : int { kScale = 0, kAddResidual = 1 };
struct DropoutCall {
  int64_t numel;
  int64_t group;  // elements per mask draw: 1, or a channel's size
  uint64_t seed;
  double p;       // a float's value: the draws are compared in float, as tl.rand's are
  double scale;   // the kept elements' multiplier, already rounded as torch rounds it
  const void* x;
  void* out;
  const void* residual;
  const void* bias;
  int64_t bias_numel;
  int threads;
};

// Weight averaging (csrc/averaging.h): lerp by a weight, or torch's add of a divided difference.
enum class AverageOp : int { kLerp = 0, kDivide = 1 };

#define PYFUSED_DECLARE_ISA(isa)                                                        \
  namespace isa {                                                                      \
  /* hyper holds hyper_size(optimizer) doubles per param group, in the order of its Hyper */ \
  int hyper_size(Optimizer);                                                           \
  int scalars_per_tensor(Optimizer);                                                   \
  void optimizer_step(Optimizer, DType, const TensorTable&, const double* hyper);      \
  /* advances the steps and writes the per-tensor scalars, for the Triton backend */  \
  void tensor_scalars(Optimizer, DType, const TensorTable&, const double* hyper, double* out); \
  /* the p-th power of the tensors' global norm (row 0 of the table); kind: csrc/norm.h */  \
  double norm_powered_sum(DType, const TensorTable&, int kind, double p);             \
  /* batch normalization's passes, csrc/batchnorm.h */                                \
  void bn_stats(DType, const BnShape&, const void* x, double* mean, double* m2);        \
  void bn_normalize(DType, const BnShape&, const void* x, void* y, const double* scale, \
                    const double* shift, bool relu);                                   \
  void bn_grad_sums(DType, const BnShape&, const void* dy, const void* x, const double* mean, \
                    const double* scale, const double* shift, bool relu, double* sum_dy, \
                    double* sum_dy_xmu);                                               \
  void bn_grad_input(DType, const BnShape&, const void* dy, const void* x, void* dx,   \
                     const double* coefficients, bool relu, bool training);            \
  void bn_finalize(DType param, const BnFinalize&);                                    \
  void bn_backward_finalize(DType param, const BnBackwardFinalize&);                   \
  /* one call per forward / backward: the steps above, fused per channel where it pays */ \
  void bn_forward(DType, DType param, const BnShape&, const void* x, void* y, const BnFinalize&, \
                  bool relu);                                                          \
  void bn_backward(DType, DType param, const BnShape&, const void* dy, const void* x, void* dx, \
                   const BnBackwardFinalize&, const double* scale, const double* shift, bool relu); \
  void dropout(DropoutOp, DType, const DropoutCall&);                                  \
  /* addresses: averages (row 0) and the model's tensors (row 1); scalar: weight or divisor */ \
  void average(AverageOp, DType, const TensorTable&, double scalar);                  \
  }
PYFUSED_DECLARE_ISA(baseline)
PYFUSED_DECLARE_ISA(avx2)
PYFUSED_DECLARE_ISA(avx512)
#undef PYFUSED_DECLARE_ISA

}  // namespace pyfused
