// Every update, instantiated for one instruction set. Each isa_*.cpp defines PYFUSED_ISA (the
// namespace that keeps the builds apart), sets the target, then includes this file once.
#include <cstring>

#include "kernels.h"
#include "optimizers.h"

namespace pyfused {
namespace PYFUSED_ISA {

template <class Family, class T>
void run(const TensorTable& table, const double* hyper) {
  typename Family::Hyper h;
  std::memcpy(&h, hyper, sizeof h);
  Family::template with_update<T>(h, [&](const auto& update) { multi_tensor_apply<T>(update, table); });
}

template <class T>
void step_for_type(Optimizer optimizer, const TensorTable& table, const double* hyper) {
  switch (optimizer) {
    case Optimizer::kSgd: return run<Sgd, T>(table, hyper);
    case Optimizer::kAdagrad: return run<Adagrad, T>(table, hyper);
    case Optimizer::kRmsprop: return run<Rmsprop, T>(table, hyper);
    case Optimizer::kAdam: return run<Adam, T>(table, hyper);
  }
}

int hyper_size(Optimizer optimizer) {
  switch (optimizer) {
    case Optimizer::kSgd: return sizeof(Sgd::Hyper) / sizeof(double);
    case Optimizer::kAdagrad: return sizeof(Adagrad::Hyper) / sizeof(double);
    case Optimizer::kRmsprop: return sizeof(Rmsprop::Hyper) / sizeof(double);
    case Optimizer::kAdam: return sizeof(Adam::Hyper) / sizeof(double);
  }
  return -1;
}

void optimizer_step(Optimizer optimizer, DType dtype, const TensorTable& table, const double* hyper) {
  switch (dtype) {
    case DType::kFloat32: return step_for_type<float>(optimizer, table, hyper);
    case DType::kFloat64: return step_for_type<double>(optimizer, table, hyper);
    case DType::kFloat16: return step_for_type<Half>(optimizer, table, hyper);
    case DType::kBFloat16: return step_for_type<BFloat16>(optimizer, table, hyper);
  }
}

}  // namespace PYFUSED_ISA
}  // namespace pyfused
