// The multi-tensor driver shared by every elementwise update.
//
// All tensors of a call lie end to end in one index space (each start rounded up to kAlign elements,
// so chunk edges fall on cache-line edges inside a tensor). That space is cut into fixed chunks of
// kChunk elements, handed out to threads from an atomic counter: small tensors share a chunk, large
// ones span many, and since the cut does not depend on the thread count, neither does the result.
//
// An update describes one element in opmath (float for 16-bit types, double for fp64):
//   kRoles          tensors per column of the address table: param, grad, then state;
//   kWrites         bit mask of the roles it writes back;
//   kCountsSteps    whether each tensor's step counter advances by one per call;
//   Scalars         per-tensor values derived from the step count and the tensor's flags,
//                   kScalars fields of type Op (so another backend can be handed them);
//   scalars(step, flags) and operator()(Op* values, const Scalars&).
//
// One call may update several param groups: the table lists them one after another, each with its
// own Hyper, so each with its own Update (its compile-time flags may differ: weight decay on or off,
// Nesterov). Their state layouts, and so their roles, must be the same.
//
// Step statistics (table.stats set; a template flag, so a call without them runs the loop it
// always ran): per tensor, the sums of squares of the grad the update saw, of the update (new
// param as stored minus old) and of the old param, from the values the loop already holds. Each
// piece of a tensor inside a chunk folds them into kStatsLanes<T> lanes (element j into lane
// j % kStatsLanes<T>, each square fused into its lane's sum as mul_add fuses) and writes the
// lanes' sum, merged in order, to its own slot; a tensor's slots are then added in chunk order.
// The result depends neither on the thread count nor on the vector width (the avx2 and avx512
// builds agree bit for bit); the baseline build, like its updates, rounds each square.
//
// Weight averaging (table.averages set; a template flag too): once the update has computed a
// new param, its average is lerped towards the param as stored, by table.average_weight, as
// AveragedModel.update_parameters would after the step (torch._foreach_lerp_, rounded as
// lerp() in csrc/optimizers.h rounds it), without reading the param again. Not an update role:
// every update gets it the same way.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "dtypes.h"
#include "kernels.h"
#include "thread_pool.h"

namespace pyfused {
namespace PYFUSED_ISA {
template <class Op>
inline Op lerp(Op self, Op end, Op weight);  // csrc/optimizers.h
template <class Op>
inline Op mul_add(Op a, Op b, Op c);  // csrc/optimizers.h
}  // namespace PYFUSED_ISA
}  // namespace pyfused

namespace pyfused {
namespace PYFUSED_ISA {

constexpr int64_t kAlign = 32;        // elements: 64 bytes for 16-bit types, 128 for float
constexpr int64_t kChunk = 1 << 14;   // elements per unit of work

// Turns runtime bools into compile-time ones: with_flags(f, a, b) calls f(bool_constant<a>, bool_constant<b>).
template <class F>
void with_flags(F&& f) { f(); }

template <class F, class... Rest>
void with_flags(F&& f, bool first, Rest... rest) {
  if (first) {
    with_flags([&](auto... more) { f(std::true_type{}, more...); }, rest...);
  } else {
    with_flags([&](auto... more) { f(std::false_type{}, more...); }, rest...);
  }
}

// What multiplies the grads before the update: GradScaler's scale (divided out, and the unscaled
// grads stored, as torch's fused optimizers do) and a clip coefficient (multiplied in; 1 when
// there is none, which changes no value).
template <class Op>
struct GradFactor {
  Op divisor = 1, multiplier = 1;
  Op average_weight = 0;  // the weight averaging's lerp weight (table.averages), in opmath
};

// One element: loads it, applies the grad factor and the update, stores what the update writes.
// Returns what the step statistics need: the grad the update saw, the old param and the change
// (the new param as stored, in opmath, minus the old one). Unused, they cost nothing.
template <class Op>
struct Seen {
  Op grad, param, change;
};

template <class T, bool kUnscale, bool kAverage, class Update, int R = Update::kRoles>
inline Seen<OpMath<T>> update_element(const Update& update, T* const (&ptr)[R], T* average, int64_t j,
                                      const typename Update::Scalars& scalars,
                                      const GradFactor<OpMath<T>>& factor) {
  using Op = OpMath<T>;
  constexpr int kParam = 0, kGrad = 1;
  Op v[R];
  for (int r = 0; r < R; ++r) v[r] = load(ptr[r] + j);
  if constexpr (kUnscale) {
    v[kGrad] = v[kGrad] / factor.divisor;
    store(ptr[kGrad] + j, v[kGrad]);  // unscaled, never clipped
  }
  v[kGrad] = v[kGrad] * factor.multiplier;
  const Op grad = v[kGrad], old = v[kParam];
  update(v, scalars);
  for (int r = 0; r < R; ++r) {
    if (Update::kWrites & (1u << r)) store(ptr[r] + j, v[r]);
  }
  T stored;
  store(&stored, v[kParam]);
  const Op now = load(&stored);
  if constexpr (kAverage) store(average + j, lerp(Op(load(average + j)), now, factor.average_weight));
  return {grad, old, now - old};
}

// Lanes per piece: one 64-byte vector of opmath floats for fp32, and as many lanes as one 64-byte
// load of a 16-bit type, so that the avx512 build runs the loop at full width (with 16 lanes GCC
// vectorizes it for 16-bit types with 32-byte vectors and spills: twice the time of the plain
// loop). Per storage type, never per instruction set, so every build sums the same lanes.
template <class T>
constexpr int kStatsLanes = sizeof(T) == 2 ? 32 : 16;
constexpr int kStats = 3;  // sums per tensor: grad^2, change^2, old param^2

// `update` is taken by value: a local copy whose fields no store can alias, so GCC hoists them
// and vectorizes the loop (by reference, several variants stayed scalar). With kTrack, `sums`
// receives this span's kStats sums (in double, its lanes merged in order).
template <class T, bool kUnscale, bool kTrack, bool kAverage, class Update>
inline void update_span(const Update update, T* const* base, T* average, int64_t offset, int64_t length,
                        const typename Update::Scalars& scalars, const GradFactor<OpMath<T>>& factor,
                        double* sums) {
  using Op = OpMath<T>;
  constexpr int R = Update::kRoles;
  T* ptr[R];
  for (int r = 0; r < R; ++r) ptr[r] = base[r] + offset;
  if constexpr (kAverage) average += offset;
  // One expression per element; the compiler emits the vector body and the scalar tail from it,
  // and both round identically: -ffp-contract=off leaves the updates' explicit fma (mul_add in
  // csrc/optimizers.h) the only fused operation.
  if constexpr (!kTrack) {
#pragma GCC ivdep
    for (int64_t j = 0; j < length; ++j) update_element<T, kUnscale, kAverage>(update, ptr, average, j, scalars, factor);
  } else {
    constexpr int L = kStatsLanes<T>;
    Op lanes[kStats][L] = {};
    // One fused multiply-add per sum: the loop is bound by its vector operations, so each saved
    // one shows (measured: Adam's stats cost one thread in cache 11% with mul and add, 7% fused).
    auto fold = [&](int l, const Seen<Op>& s) {
      lanes[0][l] = mul_add(s.grad, s.grad, lanes[0][l]);
      lanes[1][l] = mul_add(s.change, s.change, lanes[1][l]);
      lanes[2][l] = mul_add(s.param, s.param, lanes[2][l]);
    };
    int64_t j = 0;
    for (; j + L <= length; j += L) {
      if constexpr (std::is_same_v<T, Half>) {
        // GCC 12 does not vectorize a Half stored and loaded back in one loop (its narrowing
        // patterns fail, and the loop ran scalar: ten times the plain one), so the new params
        // are read back from memory in a loop of their own.
        Op grad[L], old[L];
#pragma GCC ivdep
        for (int l = 0; l < L; ++l) {
          const Seen<Op> seen = update_element<T, kUnscale, kAverage>(update, ptr, average, j + l, scalars, factor);
          grad[l] = seen.grad;
          old[l] = seen.param;
        }
        for (int l = 0; l < L; ++l) fold(l, {grad[l], old[l], load(ptr[0] + j + l) - old[l]});
      } else {
#pragma GCC ivdep
        for (int l = 0; l < L; ++l) fold(l, update_element<T, kUnscale, kAverage>(update, ptr, average, j + l, scalars, factor));
      }
    }
    for (; j < length; ++j) fold(int(j % L), update_element<T, kUnscale, kAverage>(update, ptr, average, j, scalars, factor));
    for (int k = 0; k < kStats; ++k) {
      double sum = 0;
      for (int l = 0; l < L; ++l) sum += double(lanes[k][l]);
      sums[k] = sum;
    }
  }
}

// The flat index space: tensor i starts at start[i] (each start rounded up to kAlign elements),
// cut into n_chunks chunks of kChunk elements.
struct Layout {
  std::vector<int64_t> start;
  int64_t n_chunks;
};

inline Layout lay_out(const TensorTable& table) {
  const int64_t n = table.n_tensors;
  Layout layout{std::vector<int64_t>(n + 1, 0), 0};
  for (int64_t i = 0; i < n; ++i) {
    layout.start[i + 1] = (layout.start[i] + table.numels[i] + kAlign - 1) / kAlign * kAlign;
  }
  layout.n_chunks = (layout.start[n] + kChunk - 1) / kChunk;
  return layout;
}

// Calls body(chunk, tensor, begin, end) for every piece of a tensor inside a chunk, the chunks
// handed out to table.threads threads. One thread runs all pieces of a chunk, in tensor order.
template <class Body>
void for_each_chunk(const TensorTable& table, const Layout& layout, Body&& body) {
  const auto& start = layout.start;
  const int64_t n = table.n_tensors;
  const int threads = int(std::min<int64_t>(table.threads, layout.n_chunks));
  std::atomic<int64_t> next_chunk{0};
  parallel_run(threads, [&](int) {
    for (int64_t c; (c = next_chunk.fetch_add(1, std::memory_order_relaxed)) < layout.n_chunks;) {
      const int64_t lo = c * kChunk, hi = lo + kChunk;
      // The first tensor that ends past lo; tensors are visited in order until one starts at hi.
      int64_t i = std::upper_bound(start.begin(), start.end(), lo) - start.begin() - 1;
      for (; i < n && start[i] < hi; ++i) {
        const int64_t begin = std::max(lo, start[i]) - start[i];
        const int64_t end = std::min(hi - start[i], table.numels[i]);
        if (end > begin) body(c, i, begin, end);
      }
    }
  });
}

// Advances the step counter of each tensor in [lo, hi) exactly once and derives its scalars (equal
// steps share one pow()). Serial: it is O(tensors), and every chunk of a tensor must see the same step.
template <class Update>
void prepare_tensors(const Update& update, const TensorTable& table, int64_t lo, int64_t hi,
                     typename Update::Scalars* scalars) {
  double last_step = -1;
  int64_t last_flags = -1;
  for (int64_t i = lo; i < hi; ++i) {
    double step = 0;
    if constexpr (Update::kCountsSteps) {
      if (table.steps_are_double) {
        step = *reinterpret_cast<double*>(table.steps[i]) += 1.0;
      } else {
        step = *reinterpret_cast<float*>(table.steps[i]) += 1.0f;
      }
    }
    int64_t flags = table.flags ? table.flags[i] : 0;
    if (i == lo || step != last_step || flags != last_flags) {
      scalars[i - lo] = update.scalars(step, flags);
      last_step = step;
      last_flags = flags;
    } else {
      scalars[i - lo] = scalars[i - lo - 1];
    }
  }
}

// Calls each(lo, hi, update) for every param group of the table: its tensors [lo, hi) and the
// Update built from its Hyper (hypers holds Family::Hyper's fields for each group in turn).
template <class Family, class T, class Each>
void for_each_group(const TensorTable& table, const double* hypers, Each&& each) {
  constexpr int64_t kFields = sizeof(typename Family::Hyper) / sizeof(double);
  for (int64_t g = 0, lo = 0; g < table.n_groups; lo = table.group_ends[g++]) {
    typename Family::Hyper h;
    std::memcpy(&h, hypers + g * kFields, sizeof h);
    Family::template with_update<T>(h, [&](const auto& update) { each(lo, table.group_ends[g], update); });
  }
}

// For a backend that runs the elements elsewhere (Triton): the per-tensor scalars, widened to
// double (exactly), Update::kScalars of them per tensor.
template <class Family, class T>
void export_tensor_scalars(const TensorTable& table, const double* hypers, double* out) {
  using Op = OpMath<T>;
  for_each_group<Family, T>(table, hypers, [&](int64_t lo, int64_t hi, const auto& update) {
    using Update = std::decay_t<decltype(update)>;
    std::vector<typename Update::Scalars> scalars(hi - lo);
    prepare_tensors(update, table, lo, hi, scalars.data());
    for (int64_t i = lo; i < hi; ++i) {
      Op fields[Update::kScalars + 1];
      std::memcpy(fields, &scalars[i - lo], Update::kScalars * sizeof(Op));
      for (int k = 0; k < Update::kScalars; ++k) out[i * Update::kScalars + k] = double(fields[k]);
    }
  });
}

// Where each tensor's pieces (its parts inside one chunk each) keep their statistics: tensor i's
// piece in chunk c at slot first[i] + c - start[i] / kChunk; first[n] slots in all.
inline std::vector<int64_t> stats_slots(const TensorTable& table, const Layout& layout) {
  const int64_t n = table.n_tensors;
  std::vector<int64_t> first(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pieces = table.numels[i] == 0 ? 0
        : (layout.start[i] + table.numels[i] - 1) / kChunk - layout.start[i] / kChunk + 1;
    first[i + 1] = first[i] + pieces;
  }
  return first;
}

// Each tensor's slots added in chunk order, then table.stats ([4][n] doubles): the norms of the
// grad, the update and the old param, and the update's norm over the param's (0/0 for an empty
// tensor is NaN, as in torch).
inline void finish_stats(const TensorTable& table, const std::vector<int64_t>& first,
                         const std::vector<double>& slots) {
  const int64_t n = table.n_tensors;
  for (int64_t i = 0; i < n; ++i) {
    double sums[kStats] = {};
    for (int64_t s = first[i]; s < first[i + 1]; ++s) {
      for (int k = 0; k < kStats; ++k) sums[k] += slots[s * kStats + k];
    }
    const double update = std::sqrt(sums[1]), param = std::sqrt(sums[2]);
    table.stats[i] = std::sqrt(sums[0]);
    table.stats[n + i] = update;
    table.stats[2 * n + i] = param;
    table.stats[3 * n + i] = update / param;
  }
}

// One call for every tensor of the table, whatever its param group: the groups share one index
// space and one pool of chunks; each piece of a tensor runs its group's Update.
template <class Family, class T, bool kTrack, bool kAverage>
void apply_groups(const TensorTable& table, const double* hypers) {
  using Op = OpMath<T>;
  const int64_t n = table.n_tensors;
  if (n == 0) return;
  const GradFactor<Op> factor{Op(table.grad_divisor), Op(table.grad_multiplier), Op(table.average_weight)};
  using Span = std::function<void(int64_t tensor, int64_t begin, int64_t end, double* sums)>;
  int roles = -1;  // checked before any step counter moves
  for_each_group<Family, T>(table, hypers, [&](int64_t, int64_t, const auto& update) {
    constexpr int R = std::decay_t<decltype(update)>::kRoles;
    if (roles != -1 && R != roles) throw std::invalid_argument("the param groups of one call differ in state layout");
    roles = R;
  });
  std::vector<Span> spans(table.n_groups);
  int64_t g = 0;
  for_each_group<Family, T>(table, hypers, [&](int64_t lo, int64_t hi, const auto& update) {
    using Update = std::decay_t<decltype(update)>;
    constexpr int R = Update::kRoles;
    std::vector<typename Update::Scalars> scalars(hi - lo);
    prepare_tensors(update, table, lo, hi, scalars.data());
    spans[g++] = [&table, &factor, update, lo, n, scalars = std::move(scalars)](
                     int64_t i, int64_t begin, int64_t end, double* sums) {
      T* base[R];
      for (int r = 0; r < R; ++r) base[r] = reinterpret_cast<T*>(table.addresses[r * n + i]);
      T* average = kAverage ? reinterpret_cast<T*>(table.averages[i]) : nullptr;
      if (table.store_grads) {
        update_span<T, true, kTrack, kAverage>(update, base, average, begin, end - begin, scalars[i - lo], factor, sums);
      } else {
        update_span<T, false, kTrack, kAverage>(update, base, average, begin, end - begin, scalars[i - lo], factor, sums);
      }
    };
  });
  const int64_t* ends = table.group_ends;
  const Layout layout = lay_out(table);
  std::vector<int64_t> first;
  std::vector<double> slots;
  if constexpr (kTrack) {
    first = stats_slots(table, layout);
    slots.resize(first[n] * kStats);
  }
  for_each_chunk(table, layout, [&](int64_t c, int64_t i, int64_t begin, int64_t end) {
    double* sums = nullptr;
    if constexpr (kTrack) sums = &slots[(first[i] + c - layout.start[i] / kChunk) * kStats];
    spans[std::upper_bound(ends, ends + table.n_groups, i) - ends](i, begin, end, sums);
  });
  if constexpr (kTrack) finish_stats(table, first, slots);
}

template <class Family, class T>
void multi_tensor_apply(const TensorTable& table, const double* hypers) {
  with_flags([&](auto track, auto average) { apply_groups<Family, T, track, average>(table, hypers); },
             table.stats != nullptr, table.averages != nullptr);
}

}  // namespace PYFUSED_ISA
}  // namespace pyfused
