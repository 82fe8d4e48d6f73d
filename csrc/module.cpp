// pyfused._C: raw addresses in, updates done in place. No libtorch: the Python side hands over
// data pointers, sizes and dtype codes (pyfused/_cpp.py), and validates tensors before calling.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

namespace py = pybind11;

namespace pyfused {
namespace {

struct Isa {
  const char* name;
  int (*hyper_size)(Optimizer);
  int (*scalars_per_tensor)(Optimizer);
  void (*optimizer_step)(Optimizer, DType, const TensorTable&, const double*);
  void (*tensor_scalars)(Optimizer, DType, const TensorTable&, const double*, double*);
  double (*norm_powered_sum)(DType, const TensorTable&, int, double);
  void (*dropout)(DropoutOp, DType, const DropoutCall&);
};

#define PYFUSED_ISA_ENTRY(isa) \
  Isa{#isa, isa::hyper_size, isa::scalars_per_tensor, isa::optimizer_step, isa::tensor_scalars, \
      isa::norm_powered_sum, isa::dropout}

// The widest build this CPU runs, or the one named by PYFUSED_CPU_ISA (for tests and benchmarks).
Isa pick_isa() {
  std::vector<Isa> usable{PYFUSED_ISA_ENTRY(baseline)};
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    usable.push_back(PYFUSED_ISA_ENTRY(avx2));
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl")) {
      usable.push_back(PYFUSED_ISA_ENTRY(avx512));
    }
  }
#endif
  const char* wanted = std::getenv("PYFUSED_CPU_ISA");
  if (wanted == nullptr || *wanted == '\0') return usable.back();
  std::string names;
  for (const Isa& isa : usable) {
    if (wanted == std::string(isa.name)) return isa;
    names += names.empty() ? isa.name : std::string(", ") + isa.name;
  }
  throw std::runtime_error("PYFUSED_CPU_ISA=" + std::string(wanted) +
                           " is not available on this CPU; choose one of: " + names);
}

const Isa& isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

template <class T>
const T* address(uintptr_t value) { return reinterpret_cast<const T*>(value); }

Optimizer checked_optimizer(int optimizer, int dtype, const std::vector<double>& hyper) {
  if (optimizer < 0 || optimizer > int(Optimizer::kAdam)) throw py::value_error("unknown optimizer");
  if (dtype < 0 || dtype > int(DType::kBFloat16)) throw py::value_error("unknown dtype");
  int expected = isa().hyper_size(Optimizer(optimizer));
  if (int(hyper.size()) != expected) {
    throw py::value_error("expected " + std::to_string(expected) + " hyperparameters, got " +
                          std::to_string(hyper.size()));
  }
  return Optimizer(optimizer);
}

void optimizer_step(int optimizer, int dtype, int64_t n_tensors, uintptr_t numels,
                    uintptr_t addresses, uintptr_t steps, bool steps_are_double, uintptr_t flags,
                    const std::vector<double>& hyper, int threads, double grad_divisor,
                    double grad_multiplier, bool store_grads) {
  Optimizer which = checked_optimizer(optimizer, dtype, hyper);
  TensorTable table{n_tensors,
                    address<int64_t>(numels),
                    address<int64_t>(addresses),
                    address<int64_t>(steps),
                    steps_are_double,
                    address<int64_t>(flags),
                    threads < 1 ? 1 : threads,
                    grad_divisor,
                    grad_multiplier,
                    store_grads};
  py::gil_scoped_release no_gil;
  isa().optimizer_step(which, DType(dtype), table, hyper.data());
}

double norm_powered_sum(int dtype, int64_t n_tensors, uintptr_t numels, uintptr_t addresses,
                        int kind, double p, int threads) {
  if (dtype < 0 || dtype > int(DType::kBFloat16)) throw py::value_error("unknown dtype");
  if (kind < 0 || kind > 4) throw py::value_error("unknown norm kind");
  TensorTable table{n_tensors, address<int64_t>(numels), address<int64_t>(addresses), nullptr,
                    false, nullptr, threads < 1 ? 1 : threads};
  py::gil_scoped_release no_gil;
  return isa().norm_powered_sum(DType(dtype), table, kind, p);
}

void tensor_scalars(int optimizer, int dtype, int64_t n_tensors, uintptr_t steps,
                    bool steps_are_double, uintptr_t flags, const std::vector<double>& hyper,
                    uintptr_t out) {
  Optimizer which = checked_optimizer(optimizer, dtype, hyper);
  TensorTable table{n_tensors, nullptr, nullptr, address<int64_t>(steps), steps_are_double,
                    address<int64_t>(flags), 1};
  isa().tensor_scalars(which, DType(dtype), table, hyper.data(), reinterpret_cast<double*>(out));
}

void dropout(int op, int dtype, int64_t numel, int64_t group, uint64_t seed, double p,
             double scale, uintptr_t x, uintptr_t out, uintptr_t residual, uintptr_t bias,
             int64_t bias_numel, int threads) {
  if (op < 0 || op > int(DropoutOp::kAddResidual)) throw py::value_error("unknown dropout op");
  if (dtype < 0 || dtype > int(DType::kBFloat16)) throw py::value_error("unknown dtype");
  if (numel < 0 || group < 1 || (bias != 0 && bias_numel < 1)) throw py::value_error("bad dropout sizes");
  if (op == int(DropoutOp::kAddResidual) && group != 1) throw py::value_error("dropout_add drops elements, not channels");
  DropoutCall call{numel, group, seed, p, scale,
                   address<void>(x), reinterpret_cast<void*>(out), address<void>(residual),
                   bias != 0 ? address<void>(bias) : nullptr, bias_numel, threads < 1 ? 1 : threads};
  py::gil_scoped_release no_gil;
  isa().dropout(DropoutOp(op), DType(dtype), call);
}

}  // namespace
}  // namespace pyfused

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfused's CPU kernels: multi-tensor optimizer updates on raw addresses.";
  m.def("optimizer_step", &pyfused::optimizer_step, py::arg("optimizer"), py::arg("dtype"),
        py::arg("n_tensors"), py::arg("numels"), py::arg("addresses"), py::arg("steps"),
        py::arg("steps_are_double"), py::arg("flags"), py::arg("hyper"), py::arg("threads"),
        py::arg("grad_divisor") = 1.0, py::arg("grad_multiplier") = 1.0,
        py::arg("store_grads") = false,
        "Updates n_tensors tensors in place. numels, addresses ([roles][n_tensors]), steps and\n"
        "flags are addresses of int64 arrays (0 for an absent row). Grads are divided by\n"
        "grad_divisor and multiplied by grad_multiplier first, and stored back if store_grads.");
  m.def("norm_powered_sum", &pyfused::norm_powered_sum, py::arg("dtype"), py::arg("n_tensors"),
        py::arg("numels"), py::arg("addresses"), py::arg("kind"), py::arg("p"), py::arg("threads"),
        "The p-th power of the global norm of n_tensors tensors (max |x| for kind 0, min |x| for\n"
        "kind 1), summed in a fixed order.");
  m.def("tensor_scalars", &pyfused::tensor_scalars, py::arg("optimizer"), py::arg("dtype"),
        py::arg("n_tensors"), py::arg("steps"), py::arg("steps_are_double"), py::arg("flags"),
        py::arg("hyper"), py::arg("out"),
        "Advances the step counters like optimizer_step and writes each tensor's scalars, as\n"
        "doubles, scalars_per_tensor(optimizer) per tensor, to the buffer at out.");
  m.def("dropout", &pyfused::dropout, py::arg("op"), py::arg("dtype"), py::arg("numel"),
        py::arg("group"), py::arg("seed"), py::arg("p"), py::arg("scale"), py::arg("x"),
        py::arg("out"), py::arg("residual"), py::arg("bias"), py::arg("bias_numel"),
        py::arg("threads"),
        "Dropout of numel contiguous elements at x into out (csrc/dropout.h): element i is kept\n"
        "iff tl.rand(seed, i // group) > p, and then multiplied by scale. op 1 adds the residual\n"
        "(and bias, along the last dimension, if not 0) as residual + dropout(x + bias).");
  m.def("scalars_per_tensor", [](int optimizer) {
    return pyfused::isa().scalars_per_tensor(pyfused::Optimizer(optimizer));
  });
  m.def("isa", [] { return std::string(pyfused::isa().name); },
        "The instruction set the kernels run with.");
}
