// The global norm's reduction: per (device, dtype) group, one pass over all tensors.
//
// Within a chunk, kLanes accumulators take a fixed share of the elements each (element j of a
// tensor goes to lane j % kLanes; tensors start on kAlign boundaries, so that is also the flat
// index's lane). Lanes are merged in order into the chunk's partial, and the partials in chunk
// order into the total: the result depends on neither the thread count nor the instruction set.
// Lanes accumulate in opmath (float, or double for fp64); partials and the total in double.
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include "multi_tensor.h"

namespace pyfused {
namespace PYFUSED_ISA {

// Values must match pyfused/nn/utils.py.
enum class NormKind : int { kMaxAbs = 0, kMinAbs = 1, kSumAbs = 2, kSumSquares = 3, kSumPow = 4 };

constexpr int kLanes = 16;

template <NormKind K, class A>
inline A identity() {
  return K == NormKind::kMinAbs ? std::numeric_limits<A>::infinity() : A(0);
}

// Folds one |element| into an accumulator, a lane at a time or a vector of lanes at a time:
// every lane sees the same operations in the same order either way. NaN wins over max and min,
// as in torch.
template <NormKind K, class A>
inline A fold(A acc, A x, double p) {
  if constexpr (K == NormKind::kMaxAbs) return (x > acc || x != x) ? x : acc;
  if constexpr (K == NormKind::kMinAbs) return (x < acc || x != x) ? x : acc;
  if constexpr (K == NormKind::kSumAbs) return acc + x;
  if constexpr (K == NormKind::kSumSquares) return acc + x * x;
  return acc + std::pow(x, decltype(x)(p));
}

template <class A>
struct LaneVector {
  typedef A type __attribute__((vector_size(kLanes * sizeof(A))));
};

template <NormKind K, class V>
inline V fold_lanes(V acc, V x, double p) {
  if constexpr (K == NormKind::kMaxAbs) return ((x > acc) | (x != x)) ? x : acc;
  if constexpr (K == NormKind::kMinAbs) return ((x < acc) | (x != x)) ? x : acc;
  if constexpr (K == NormKind::kSumAbs) return acc + x;
  if constexpr (K == NormKind::kSumSquares) return acc + x * x;
  for (int l = 0; l < kLanes; ++l) acc[l] = fold<K>(acc[l], x[l], p);  // no vector pow
  return acc;
}

// Merges two accumulators of the same kind.
template <NormKind K, class A>
inline A merge(A a, A b) {
  if constexpr (K == NormKind::kMaxAbs) return (b > a || b != b) ? b : a;
  if constexpr (K == NormKind::kMinAbs) return (b < a || b != b) ? b : a;
  return a + b;
}

// The sum of |x|^p over every element (max |x| for p = inf, min |x| for p = -inf): the p-th
// power of the norm, which is what ranks all-reduce before the root is taken.
template <class T, NormKind K>
double powered_sum(const TensorTable& table, double p) {
  using A = OpMath<T>;
  using V = typename LaneVector<A>::type;
  const Layout layout = lay_out(table);
  std::vector<double> partial(layout.n_chunks, identity<K, double>());
  for_each_chunk(table, layout, [&](int64_t c, int64_t i, int64_t begin, int64_t end) {
    const T* x = reinterpret_cast<const T*>(table.addresses[i]);
    V lanes;
    for (int l = 0; l < kLanes; ++l) lanes[l] = identity<K, A>();
    int64_t j = begin;
    for (; j + kLanes <= end; j += kLanes) {
      V v;
      for (int l = 0; l < kLanes; ++l) v[l] = load(x + j + l);
      lanes = fold_lanes<K>(lanes, v < 0 ? -v : v, p);
    }
    for (; j < end; ++j) {
      A v = load(x + j);
      lanes[j % kLanes] = fold<K>(lanes[j % kLanes], v < 0 ? -v : v, p);
    }
    for (int l = 0; l < kLanes; ++l) partial[c] = merge<K>(partial[c], double(lanes[l]));
  });
  double total = identity<K, double>();
  for (double chunk : partial) total = merge<K>(total, chunk);
  return total;
}

template <class T>
double powered_sum_of_kind(const TensorTable& table, NormKind kind, double p) {
  switch (kind) {
    case NormKind::kMaxAbs: return powered_sum<T, NormKind::kMaxAbs>(table, p);
    case NormKind::kMinAbs: return powered_sum<T, NormKind::kMinAbs>(table, p);
    case NormKind::kSumAbs: return powered_sum<T, NormKind::kSumAbs>(table, p);
    case NormKind::kSumSquares: return powered_sum<T, NormKind::kSumSquares>(table, p);
    case NormKind::kSumPow: return powered_sum<T, NormKind::kSumPow>(table, p);
  }
  return 0;
}

}  // namespace PYFUSED_ISA
}  // namespace pyfused
