// Every update, instantiated for one instruction set. Each isa_*.cpp defines PYFUSED_ISA (the
// namespace that keeps the builds apart), sets the target, then includes this file once.
#include <cstring>

#include "averaging.h"
#include "batchnorm.h"
#include "dropout.h"
#include "kernels.h"
#include "norm.h"
#include "optimizers.h"

namespace pyfused {
namespace PYFUSED_ISA {

template <class Family, class T>
void run(const TensorTable& table, const double* hyper) { multi_tensor_apply<Family, T>(table, hyper); }

template <class Family, class T>
void export_scalars(const TensorTable& table, const double* hyper, double* out) {
  export_tensor_scalars<Family, T>(table, hyper, out);
}

template <class T>
void step_for_type(Optimizer optimizer, const TensorTable& table, const double* hyper) {
  switch (optimizer) {
    case Optimizer::kSgd: return run<Sgd, T>(table, hyper);
    case Optimizer::kAdagrad: return run<Adagrad, T>(table, hyper);
    case Optimizer::kRmsprop: return run<Rmsprop, T>(table, hyper);
    case Optimizer::kAdam: return run<Adam, T>(table, hyper);
    case Optimizer::kAdadelta: return run<Adadelta, T>(table, hyper);
  }
}

int scalars_per_tensor(Optimizer optimizer) {
  switch (optimizer) {
    case Optimizer::kSgd: return Sgd::Update<float, false, false, false>::kScalars;
    case Optimizer::kAdagrad: return Adagrad::Update<float, false>::kScalars;
    case Optimizer::kRmsprop: return Rmsprop::Update<float, false, false, false>::kScalars;
    case Optimizer::kAdam: return Adam::Update<float, false, false>::kScalars;
    case Optimizer::kAdadelta: return Adadelta::Update<float, false>::kScalars;
  }
  return -1;
}

int hyper_size(Optimizer optimizer) {
  switch (optimizer) {
    case Optimizer::kSgd: return sizeof(Sgd::Hyper) / sizeof(double);
    case Optimizer::kAdagrad: return sizeof(Adagrad::Hyper) / sizeof(double);
    case Optimizer::kRmsprop: return sizeof(Rmsprop::Hyper) / sizeof(double);
    case Optimizer::kAdam: return sizeof(Adam::Hyper) / sizeof(double);
    case Optimizer::kAdadelta: return sizeof(Adadelta::Hyper) / sizeof(double);
  }
  return -1;
}

template <class T>
void scalars_for_type(Optimizer optimizer, const TensorTable& table, const double* hyper, double* out) {
  switch (optimizer) {
    case Optimizer::kSgd: return export_scalars<Sgd, T>(table, hyper, out);
    case Optimizer::kAdagrad: return export_scalars<Adagrad, T>(table, hyper, out);
    case Optimizer::kRmsprop: return export_scalars<Rmsprop, T>(table, hyper, out);
    case Optimizer::kAdam: return export_scalars<Adam, T>(table, hyper, out);
    case Optimizer::kAdadelta: return export_scalars<Adadelta, T>(table, hyper, out);
  }
}

void optimizer_step(Optimizer optimizer, DType dtype, const TensorTable& table, const double* hyper) {
  switch (dtype) {
    case DType::kFloat32: return step_for_type<float>(optimizer, table, hyper);
    case DType::kFloat64: return step_for_type<double>(optimizer, table, hyper);
    case DType::kFloat16: return step_for_type<Half>(optimizer, table, hyper);
    case DType::kBFloat16: return step_for_type<BFloat16>(optimizer, table, hyper);
  }
}

double norm_powered_sum(DType dtype, const TensorTable& table, int kind, double p) {
  switch (dtype) {
    case DType::kFloat32: return powered_sum_of_kind<float>(table, NormKind(kind), p);
    case DType::kFloat64: return powered_sum_of_kind<double>(table, NormKind(kind), p);
    case DType::kFloat16: return powered_sum_of_kind<Half>(table, NormKind(kind), p);
    case DType::kBFloat16: return powered_sum_of_kind<BFloat16>(table, NormKind(kind), p);
  }
  return 0;
}

void dropout(DropoutOp op, DType dtype, const DropoutCall& call) {
  switch (dtype) {
    case DType::kFloat32: return dropout_for_type<float>(op, call);
    case DType::kFloat64: return dropout_for_type<double>(op, call);
    case DType::kFloat16: return dropout_for_type<Half>(op, call);
    case DType::kBFloat16: return dropout_for_type<BFloat16>(op, call);
  }
}

void average(AverageOp op, DType dtype, const TensorTable& table, double scalar) {
  switch (dtype) {
    case DType::kFloat32: return average_for_type<float>(op, table, scalar);
    case DType::kFloat64: return average_for_type<double>(op, table, scalar);
    case DType::kFloat16: return average_for_type<Half>(op, table, scalar);
    case DType::kBFloat16: return average_for_type<BFloat16>(op, table, scalar);
  }
}

void tensor_scalars(Optimizer optimizer, DType dtype, const TensorTable& table, const double* hyper,
                    double* out) {
  // Only the opmath type matters here: float for every type but double.
  if (dtype == DType::kFloat64) return scalars_for_type<double>(optimizer, table, hyper, out);
  return scalars_for_type<float>(optimizer, table, hyper, out);
}

// Batch normalization: one switch over the input's (or the parameters') dtype per entry.
template <class F>
void with_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat64: return f(double{});
    case DType::kFloat16: return f(Half{});
    case DType::kBFloat16: return f(BFloat16{});
  }
}

#define PYFUSED_TYPED(dtype, call) with_type(dtype, [&](auto tag) { using T = decltype(tag); call; })

void bn_stats(DType dtype, const BnShape& s, const void* x, double* mean, double* m2) {
  PYFUSED_TYPED(dtype, batchnorm::stats<T>(s, x, mean, m2));
}
void bn_normalize(DType dtype, const BnShape& s, const void* x, void* y, const double* scale,
                  const double* shift, bool relu) {
  PYFUSED_TYPED(dtype, batchnorm::normalize<T>(s, x, y, scale, shift, relu));
}
void bn_grad_sums(DType dtype, const BnShape& s, const void* dy, const void* x, const double* mean,
                  const double* scale, const double* shift, bool relu, double* sum_dy, double* sum_dy_xmu) {
  PYFUSED_TYPED(dtype, batchnorm::grad_sums<T>(s, dy, x, mean, scale, shift, relu, sum_dy, sum_dy_xmu));
}
void bn_grad_input(DType dtype, const BnShape& s, const void* dy, const void* x, void* dx,
                   const double* coefficients, bool relu, bool training) {
  PYFUSED_TYPED(dtype, batchnorm::grad_input<T>(s, dy, x, dx, coefficients, relu, training));
}
void bn_finalize(DType param, const BnFinalize& f) { PYFUSED_TYPED(param, batchnorm::finalize<T>(f)); }
void bn_backward_finalize(DType param, const BnBackwardFinalize& f) {
  PYFUSED_TYPED(param, batchnorm::backward_finalize<T>(f));
}
void bn_forward(DType dtype, DType param, const BnShape& s, const void* x, void* y, const BnFinalize& f,
                bool relu) {
  batchnorm::FinalizeChannels finalize = nullptr;
  PYFUSED_TYPED(param, finalize = batchnorm::finalize_channels<T>);
  PYFUSED_TYPED(dtype, batchnorm::forward<T>(s, x, y, f, finalize, relu));
}
void bn_backward(DType dtype, DType param, const BnShape& s, const void* dy, const void* x, void* dx,
                 const BnBackwardFinalize& f, const double* scale, const double* shift, bool relu) {
  batchnorm::BackwardFinalizeChannels finish = nullptr;
  PYFUSED_TYPED(param, finish = batchnorm::backward_finalize_channels<T>);
  PYFUSED_TYPED(dtype, batchnorm::backward<T>(s, dy, x, dx, f, finish, scale, shift, relu));
}

#undef PYFUSED_TYPED

}  // namespace PYFUSED_ISA
}  // namespace pyfused
