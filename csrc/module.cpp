// pyfused._C: raw addresses in, updates done in place. No libtorch: the Python side hands over
// data pointers, sizes and dtype codes (pyfused/_cpp.py), and validates tensors before calling.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdlib>
#include <stdexcept>
#if defined(__linux__)
#include <sys/mman.h>  // madvise for fresh outputs
#endif
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
  void (*bn_stats)(DType, const BnShape&, const void*, double*, double*);
  void (*bn_normalize)(DType, const BnShape&, const void*, void*, const double*, const double*, bool);
  void (*bn_grad_sums)(DType, const BnShape&, const void*, const void*, const double*, const double*,
                       const double*, bool, double*, double*);
  void (*bn_grad_input)(DType, const BnShape&, const void*, const void*, void*, const double*, bool, bool);
  void (*bn_finalize)(DType, const BnFinalize&);
  void (*bn_backward_finalize)(DType, const BnBackwardFinalize&);
  void (*bn_forward)(DType, DType, const BnShape&, const void*, void*, const BnFinalize&, bool);
  void (*bn_backward)(DType, DType, const BnShape&, const void*, const void*, void*, const BnBackwardFinalize&,
                      const double*, const double*, bool);
  void (*dropout)(DropoutOp, DType, const DropoutCall&);
  void (*average)(AverageOp, DType, const TensorTable&, double);
};

#define PYFUSED_ISA_ENTRY(isa) \
  Isa{#isa, isa::hyper_size, isa::scalars_per_tensor, isa::optimizer_step, isa::tensor_scalars, \
      isa::norm_powered_sum, isa::bn_stats, isa::bn_normalize, isa::bn_grad_sums, isa::bn_grad_input, \
      isa::bn_finalize, isa::bn_backward_finalize, isa::bn_forward, isa::bn_backward, \
      isa::dropout, isa::average}

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

template <class T>
T* mutable_address(uintptr_t value) { return reinterpret_cast<T*>(value); }

Optimizer checked_optimizer(int optimizer, int dtype, int64_t n_tensors, int64_t n_groups,
                            uintptr_t group_ends) {
  if (optimizer < 0 || optimizer > int(Optimizer::kAdadelta)) throw py::value_error("unknown optimizer");
  if (dtype < 0 || dtype > int(DType::kBFloat16)) throw py::value_error("unknown dtype");
  // The groups must cover the tensors in order: a kernel indexes the table by them.
  const int64_t* ends = address<int64_t>(group_ends);
  if (n_groups < 1 || ends == nullptr) throw py::value_error("expected at least one param group");
  for (int64_t g = 0; g < n_groups; ++g) {
    if (ends[g] < (g ? ends[g - 1] : 0)) throw py::value_error("param groups out of order");
  }
  if (ends[n_groups - 1] != n_tensors) throw py::value_error("the param groups do not cover the tensors");
  return Optimizer(optimizer);
}

void optimizer_step(int optimizer, int dtype, int64_t n_tensors, uintptr_t numels,
                    uintptr_t addresses, uintptr_t steps, bool steps_are_double, uintptr_t flags,
                    int64_t n_groups, uintptr_t group_ends, uintptr_t hypers, int threads,
                    double grad_divisor, double grad_multiplier, bool store_grads, uintptr_t stats,
                    uintptr_t averages, double average_weight) {
  Optimizer which = checked_optimizer(optimizer, dtype, n_tensors, n_groups, group_ends);
  TensorTable table{n_tensors,
                    address<int64_t>(numels),
                    address<int64_t>(addresses),
                    address<int64_t>(steps),
                    steps_are_double,
                    address<int64_t>(flags),
                    threads < 1 ? 1 : threads,
                    grad_divisor,
                    grad_multiplier,
                    store_grads,
                    n_groups,
                    address<int64_t>(group_ends),
                    mutable_address<double>(stats),
                    address<int64_t>(averages),
                    average_weight};
  py::gil_scoped_release no_gil;
  try {
    isa().optimizer_step(which, DType(dtype), table, address<double>(hypers));
  } catch (const std::invalid_argument& error) {
    throw py::value_error(error.what());
  }
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
                    bool steps_are_double, uintptr_t flags, int64_t n_groups, uintptr_t group_ends,
                    uintptr_t hypers, uintptr_t out) {
  Optimizer which = checked_optimizer(optimizer, dtype, n_tensors, n_groups, group_ends);
  TensorTable table{n_tensors, nullptr, nullptr, address<int64_t>(steps), steps_are_double,
                    address<int64_t>(flags), 1};
  table.n_groups = n_groups;
  table.group_ends = address<int64_t>(group_ends);
  isa().tensor_scalars(which, DType(dtype), table, address<double>(hypers), reinterpret_cast<double*>(out));
}

// A fresh output of megabytes is first touched by the kernel, and with 4 KiB pages the page
// faults cost more than the kernel itself: its whole 2 MiB pages are asked to be huge ones (what
// torch's allocator does for every allocation under THP_MEM_ALLOC_ENABLE=1). Advice only: where
// transparent huge pages are off, or the call fails, nothing changes.
void advise_huge_pages(uintptr_t begin, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + bytes) & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#endif
}

// fresh: the numel elements of dtype d at `out` (an op's output) were just allocated.
void advise_fresh_output(bool fresh, DType d, size_t numel, uintptr_t out) {
  if (!fresh || out == 0) return;
  const size_t element_size = d == DType::kFloat64 ? 8 : d == DType::kFloat32 ? 4 : 2;
  advise_huge_pages(out, numel * element_size);
}

// Batch normalization (csrc/batchnorm.h). Python checks shapes, dtypes and layouts.
DType checked_dtype(int dtype) {
  if (dtype < 0 || dtype > int(DType::kBFloat16)) throw py::value_error("unknown dtype");
  return DType(dtype);
}

BnShape bn_shape(int64_t outer, int64_t channels, int64_t inner, int threads) {
  if (outer < 0 || channels < 0 || inner < 0) throw py::value_error("negative extent");
  return BnShape{outer, channels, inner, threads < 1 ? 1 : threads};
}

// fresh: the output of s's extent at `out` (y, dx) was just allocated.
void advise_fresh_output(bool fresh, DType d, const BnShape& s, uintptr_t out) {
  advise_fresh_output(fresh, d, size_t(s.outer) * size_t(s.channels) * size_t(s.inner), out);
}

void bn_stats(int dtype, int64_t outer, int64_t channels, int64_t inner, uintptr_t x, uintptr_t mean,
              uintptr_t m2, int threads) {
  DType d = checked_dtype(dtype);
  BnShape s = bn_shape(outer, channels, inner, threads);
  py::gil_scoped_release no_gil;
  isa().bn_stats(d, s, address<void>(x), mutable_address<double>(mean), mutable_address<double>(m2));
}

void bn_normalize(int dtype, int64_t outer, int64_t channels, int64_t inner, uintptr_t x, uintptr_t y,
                  uintptr_t scale, uintptr_t shift, bool relu, int threads, bool fresh_out) {
  DType d = checked_dtype(dtype);
  BnShape s = bn_shape(outer, channels, inner, threads);
  py::gil_scoped_release no_gil;
  advise_fresh_output(fresh_out, d, s, y);
  isa().bn_normalize(d, s, address<void>(x), mutable_address<void>(y), address<double>(scale),
                     address<double>(shift), relu);
}

void bn_grad_sums(int dtype, int64_t outer, int64_t channels, int64_t inner, uintptr_t dy, uintptr_t x,
                  uintptr_t mean, uintptr_t scale, uintptr_t shift, bool relu, uintptr_t sum_dy,
                  uintptr_t sum_dy_xmu, int threads) {
  DType d = checked_dtype(dtype);
  BnShape s = bn_shape(outer, channels, inner, threads);
  py::gil_scoped_release no_gil;
  isa().bn_grad_sums(d, s, address<void>(dy), address<void>(x), address<double>(mean), address<double>(scale),
                     address<double>(shift), relu, mutable_address<double>(sum_dy),
                     mutable_address<double>(sum_dy_xmu));
}

void bn_grad_input(int dtype, int64_t outer, int64_t channels, int64_t inner, uintptr_t dy, uintptr_t x,
                   uintptr_t dx, uintptr_t coefficients, bool relu, bool training, int threads,
                   bool fresh_out) {
  DType d = checked_dtype(dtype);
  BnShape s = bn_shape(outer, channels, inner, threads);
  py::gil_scoped_release no_gil;
  advise_fresh_output(fresh_out, d, s, dx);
  isa().bn_grad_input(d, s, address<void>(dy), address<void>(x), mutable_address<void>(dx),
                      address<double>(coefficients), relu, training);
}

void bn_finalize(int param_dtype, int64_t channels, int64_t groups, uintptr_t counts, uintptr_t means,
                 uintptr_t m2s, uintptr_t weight, uintptr_t bias, uintptr_t running_mean,
                 uintptr_t running_var, double momentum, double eps, uintptr_t save_mean,
                 uintptr_t save_invstd, uintptr_t scale, uintptr_t shift) {
  BnFinalize f{channels, groups, address<double>(counts), address<double>(means), address<double>(m2s),
               address<void>(weight), address<void>(bias), mutable_address<void>(running_mean),
               mutable_address<void>(running_var), momentum, eps, mutable_address<double>(save_mean),
               mutable_address<double>(save_invstd), mutable_address<double>(scale),
               mutable_address<double>(shift)};
  isa().bn_finalize(checked_dtype(param_dtype), f);
}

void bn_backward_finalize(int param_dtype, int64_t channels, double count, bool training, uintptr_t sum_dy,
                          uintptr_t sum_dy_xmu, uintptr_t mean, uintptr_t invstd, uintptr_t weight,
                          uintptr_t bias, uintptr_t dweight, uintptr_t dbias, uintptr_t coefficients) {
  BnBackwardFinalize f{channels, count, training, address<double>(sum_dy), address<double>(sum_dy_xmu),
                       address<double>(mean), address<double>(invstd), address<void>(weight),
                       address<void>(bias), mutable_address<void>(dweight), mutable_address<void>(dbias),
                       mutable_address<double>(coefficients)};
  isa().bn_backward_finalize(checked_dtype(param_dtype), f);
}

// One call per training or eval forward: saved ([4][channels] doubles) gets mean, invstd, scale
// and shift; the running stats move in training. An empty batch leaves them as they are.
void bn_forward(int dtype, int param_dtype, int64_t outer, int64_t channels, int64_t inner, uintptr_t x,
                uintptr_t y, uintptr_t weight, uintptr_t bias, uintptr_t running_mean, uintptr_t running_var,
                bool training, double momentum, double eps, bool relu, uintptr_t saved, int threads,
                bool fresh_out) {
  DType d = checked_dtype(dtype), p = checked_dtype(param_dtype);
  BnShape s = bn_shape(outer, channels, inner, threads);
  double* out = mutable_address<double>(saved);
  const double count = double(outer) * double(inner);
  if (count == 0) {
    std::fill(out, out + 4 * channels, 0.0);
    return;
  }
  BnFinalize f{channels, training ? 1 : 0, &count, nullptr, nullptr, address<void>(weight), address<void>(bias),
               mutable_address<void>(running_mean), mutable_address<void>(running_var), momentum, eps, out,
               out + channels, out + 2 * channels, out + 3 * channels};
  py::gil_scoped_release no_gil;
  advise_fresh_output(fresh_out, d, s, y);
  isa().bn_forward(d, p, s, address<void>(x), mutable_address<void>(y), f, relu);
}

// One call per backward, from bn_forward's saved values: dx (if not 0), dweight and dbias (if not 0).
// fresh_out, here and in the other bindings: the output (y, dx) was just allocated.
void bn_backward(int dtype, int param_dtype, int64_t outer, int64_t channels, int64_t inner, uintptr_t dy,
                 uintptr_t x, uintptr_t dx, uintptr_t saved, uintptr_t weight, uintptr_t bias, uintptr_t dweight,
                 uintptr_t dbias, bool training, bool relu, int threads, bool fresh_out) {
  DType d = checked_dtype(dtype), p = checked_dtype(param_dtype);
  BnShape s = bn_shape(outer, channels, inner, threads);
  const double* values = address<double>(saved);
  BnBackwardFinalize f{channels, double(outer) * double(inner), training, nullptr, nullptr, values,
                       values + channels, address<void>(weight), address<void>(bias), mutable_address<void>(dweight),
                       mutable_address<void>(dbias), nullptr};
  py::gil_scoped_release no_gil;
  advise_fresh_output(fresh_out, d, s, dx);
  isa().bn_backward(d, p, s, address<void>(dy), address<void>(x), mutable_address<void>(dx), f,
                    values + 2 * channels, values + 3 * channels, relu);
}

void dropout(int op, int dtype, int64_t numel, int64_t group, uint64_t seed, double p,
             double scale, uintptr_t x, uintptr_t out, uintptr_t residual, uintptr_t bias,
             int64_t bias_numel, int threads, bool fresh_out) {
  if (op < 0 || op > int(DropoutOp::kAddResidual)) throw py::value_error("unknown dropout op");
  if (dtype < 0 || dtype > int(DType::kBFloat16)) throw py::value_error("unknown dtype");
  if (numel < 0 || group < 1 || (bias != 0 && bias_numel < 1)) throw py::value_error("bad dropout sizes");
  if (op == int(DropoutOp::kAddResidual) && group != 1) throw py::value_error("dropout_add drops elements, not channels");
  DropoutCall call{numel, group, seed, p, scale,
                   address<void>(x), reinterpret_cast<void*>(out), address<void>(residual),
                   bias != 0 ? address<void>(bias) : nullptr, bias_numel, threads < 1 ? 1 : threads};
  py::gil_scoped_release no_gil;
  advise_fresh_output(fresh_out, DType(dtype), size_t(numel), out);
  isa().dropout(DropoutOp(op), DType(dtype), call);
}

void average(int op, int dtype, int64_t n_tensors, uintptr_t numels, uintptr_t addresses, double scalar,
             int threads) {
  if (op < 0 || op > int(AverageOp::kDivide)) throw py::value_error("unknown averaging op");
  DType d = checked_dtype(dtype);
  TensorTable table{n_tensors, address<int64_t>(numels), address<int64_t>(addresses), nullptr, false,
                    nullptr, threads < 1 ? 1 : threads};
  py::gil_scoped_release no_gil;
  isa().average(AverageOp(op), d, table, scalar);
}

}  // namespace
}  // namespace pyfused

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyfused's CPU kernels: multi-tensor optimizer updates on raw addresses.";
  m.def("optimizer_step", &pyfused::optimizer_step, py::arg("optimizer"), py::arg("dtype"),
        py::arg("n_tensors"), py::arg("numels"), py::arg("addresses"), py::arg("steps"),
        py::arg("steps_are_double"), py::arg("flags"), py::arg("n_groups"), py::arg("group_ends"),
        py::arg("hypers"), py::arg("threads"), py::arg("grad_divisor") = 1.0,
        py::arg("grad_multiplier") = 1.0, py::arg("store_grads") = false, py::arg("stats") = 0,
        py::arg("averages") = 0, py::arg("average_weight") = 0.0,
        "Updates n_tensors tensors in place. numels, addresses ([roles][n_tensors]), steps and\n"
        "flags are addresses of int64 arrays (0 for an absent row). The tensors form n_groups\n"
        "param groups, group g ending at group_ends[g] (int64s), with hyper_size(optimizer)\n"
        "doubles each at hypers. Grads are divided by grad_divisor and multiplied by\n"
        "grad_multiplier first, and stored back if store_grads. If stats is not 0, it is the\n"
        "address of [4][n_tensors] doubles that receive each tensor's grad norm, update norm\n"
        "(new minus old param), old param norm and update norm / param norm. If averages is not\n"
        "0, it is the address of n_tensors int64 addresses of averages, each lerped towards its\n"
        "new param by average_weight after the update.");
  m.def("norm_powered_sum", &pyfused::norm_powered_sum, py::arg("dtype"), py::arg("n_tensors"),
        py::arg("numels"), py::arg("addresses"), py::arg("kind"), py::arg("p"), py::arg("threads"),
        "The p-th power of the global norm of n_tensors tensors (max |x| for kind 0, min |x| for\n"
        "kind 1), summed in a fixed order.");
  m.def("tensor_scalars", &pyfused::tensor_scalars, py::arg("optimizer"), py::arg("dtype"),
        py::arg("n_tensors"), py::arg("steps"), py::arg("steps_are_double"), py::arg("flags"),
        py::arg("n_groups"), py::arg("group_ends"), py::arg("hypers"), py::arg("out"),
        "Advances the step counters like optimizer_step and writes each tensor's scalars, as\n"
        "doubles, scalars_per_tensor(optimizer) per tensor, to the buffer at out.");
  m.def("dropout", &pyfused::dropout, py::arg("op"), py::arg("dtype"), py::arg("numel"),
        py::arg("group"), py::arg("seed"), py::arg("p"), py::arg("scale"), py::arg("x"),
        py::arg("out"), py::arg("residual"), py::arg("bias"), py::arg("bias_numel"),
        py::arg("threads"), py::arg("fresh_out") = false,
        "Dropout of numel contiguous elements at x into out (csrc/dropout.h): element i is kept\n"
        "iff tl.rand(seed, i // group) > p, and then multiplied by scale. op 1 adds the residual\n"
        "(and bias, along the last dimension, if not 0) as residual + dropout(x + bias). fresh_out:\n"
        "out is untouched memory just allocated, whose page faults huge pages may spare.");
  m.def("average", &pyfused::average, py::arg("op"), py::arg("dtype"), py::arg("n_tensors"),
        py::arg("numels"), py::arg("addresses"), py::arg("scalar"), py::arg("threads"),
        "Updates n_tensors averages in place from the model's tensors (csrc/averaging.h): addresses\n"
        "([2][n_tensors]) holds the averages', then the model's; op 0 lerps by the weight `scalar`,\n"
        "op 1 adds (model - average) / scalar.");
  m.def("hyper_size", [](int optimizer) {
    return pyfused::isa().hyper_size(pyfused::Optimizer(optimizer));
  });
  m.def("scalars_per_tensor", [](int optimizer) {
    return pyfused::isa().scalars_per_tensor(pyfused::Optimizer(optimizer));
  });
  m.def("bn_stats", &pyfused::bn_stats,
        "Per-channel mean and sum of squared deviations (double) of an (outer, C, inner) tensor.");
  m.def("bn_normalize", &pyfused::bn_normalize, "y = x * scale + shift per channel (ReLU if relu).");
  m.def("bn_grad_sums", &pyfused::bn_grad_sums, "Per-channel sum dy and sum dy * (x - mean) (double).");
  m.def("bn_grad_input", &pyfused::bn_grad_input, "dx from dy, x and the [6][C] backward coefficients.");
  m.def("bn_finalize", &pyfused::bn_finalize,
        "Merges per-channel statistics, updates the running stats, writes mean, invstd, scale, shift.");
  m.def("bn_backward_finalize", &pyfused::bn_backward_finalize,
        "dweight, dbias and the grad_input coefficients from the per-channel grad sums.");
  m.def("bn_forward", &pyfused::bn_forward,
        "Training or eval forward in one call: statistics, running stats, y; [4][C] saved values.");
  m.def("bn_backward", &pyfused::bn_backward, "dx, dweight and dbias in one call, from bn_forward's saved values.");
  m.def("isa", [] { return std::string(pyfused::isa().name); },
        "The instruction set the kernels run with.");
}
