// The global norm's reduction: per (device, dtype) group, one pass over all tensors.
//
// Within a chunk, kLanes accumulators take a fixed share of the elements each (element j of a
// tensor goes to lane j % kLanes; tensors start on kAlign boundaries, so that is also the flat
// index's lane). Lanes are merged in order into the chunk's partial, and the partials in chunk
// order into the total: the result depends on neither the thread count nor the instruction set.
// Lanes accumulate in opmath (float, or double for fp64); partials and the total in double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
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

// Native vectors: a variable of a vector type wider than the ISA's registers lives in memory
// (GCC splits its operations but not its storage), which spilled the lanes on every iteration.
// So the kLanes lanes are kLanes / width registers of the ISA's own width, each an independent
// accumulator: lane l is element l of register l / width, whatever the width.
// The width comes from the build's name: GCC's `#pragma GCC target` (csrc/isa_*.cpp) does not
// define __AVX2__ and friends in C++.
#define PYFUSED_NORM_VECTOR_BYTES_baseline 16
#define PYFUSED_NORM_VECTOR_BYTES_avx2 32
#define PYFUSED_NORM_VECTOR_BYTES_avx512 64
#define PYFUSED_NORM_CAT(a, b) a##b
#define PYFUSED_NORM_VECTOR_BYTES(isa) PYFUSED_NORM_CAT(PYFUSED_NORM_VECTOR_BYTES_, isa)
constexpr int kVectorBytes = PYFUSED_NORM_VECTOR_BYTES(PYFUSED_ISA);

template <class A>
struct Lanes {
  static constexpr int kWidth = kVectorBytes / int(sizeof(A));
  static constexpr int kRegisters = kLanes / kWidth;
  typedef A Vector __attribute__((vector_size(kVectorBytes)));
};

template <NormKind K, class V>
inline V fold_lanes(V acc, V x) {
  if constexpr (K == NormKind::kSumSquares) return acc + x * x;  // x * x == |x| * |x|, exactly
  const V a = x < 0 ? -x : x;
  if constexpr (K == NormKind::kMaxAbs) return ((a > acc) | (a != a)) ? a : acc;
  if constexpr (K == NormKind::kMinAbs) return ((a < acc) | (a != a)) ? a : acc;
  return acc + a;  // kSumAbs
}

// Merges two accumulators of the same kind.
template <NormKind K, class A>
inline A merge(A a, A b) {
  if constexpr (K == NormKind::kMaxAbs) return (b > a || b != b) ? b : a;
  if constexpr (K == NormKind::kMinAbs) return (b < a || b != b) ? b : a;
  return a + b;
}

// Elements of 16-bit types are widened a block at a time into a buffer (the conversion loop of
// dtypes.h vectorizes), which the vector loop then reads like float elements.
constexpr int64_t kWidenBlock = 512;  // a multiple of kLanes: blocks keep the lanes' positions

// Folds n opmath values at x into the lanes, kLanes at a time, element j into lane j % kLanes;
// returns how many it folded (the rest, fewer than kLanes, is the caller's tail).
template <NormKind K, class A>
inline int64_t fold_vectors(typename Lanes<A>::Vector (&acc)[Lanes<A>::kRegisters], const A* x, int64_t n) {
  using L = Lanes<A>;
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma GCC unroll 16
    for (int r = 0; r < L::kRegisters; ++r) {
      typename L::Vector v;
      std::memcpy(&v, x + j + r * L::kWidth, sizeof v);
      acc[r] = fold_lanes<K>(acc[r], v);
    }
  }
  return j;
}

// The sum of |x|^p over every element (max |x| for p = inf, min |x| for p = -inf): the p-th
// power of the norm, which is what ranks all-reduce before the root is taken.
template <class T, NormKind K>
double powered_sum(const TensorTable& table, double p) {
  using A = OpMath<T>;
  using L = Lanes<A>;
  const Layout layout = lay_out(table);
  std::vector<double> partial(layout.n_chunks, identity<K, double>());
  for_each_chunk(table, layout, [&](int64_t c, int64_t i, int64_t begin, int64_t end) {
    const T* x = reinterpret_cast<const T*>(table.addresses[i]) + begin;
    const int64_t n = end - begin;
    A lanes[kLanes];
    int64_t j = 0;
    if constexpr (K == NormKind::kSumPow) {  // no vector pow: lane by lane
      for (int l = 0; l < kLanes; ++l) lanes[l] = identity<K, A>();
    } else {
      typename L::Vector acc[L::kRegisters];
      for (int r = 0; r < L::kRegisters; ++r) {
        for (int l = 0; l < L::kWidth; ++l) acc[r][l] = identity<K, A>();
      }
      if constexpr (std::is_same_v<T, A>) {
        j = fold_vectors<K, A>(acc, x, n);
      } else {
        A wide[kWidenBlock];
        for (; j + kLanes <= n; j += kWidenBlock) {
          const int64_t m = std::min(kWidenBlock, (n - j) / kLanes * kLanes);
          for (int64_t k = 0; k < m; ++k) wide[k] = load(x + j + k);
          fold_vectors<K, A>(acc, wide, m);
          if (m < kWidenBlock) { j += m; break; }
        }
      }
      std::memcpy(lanes, acc, sizeof lanes);
    }
    for (; j < n; ++j) {  // the tail (and every element for kSumPow), in the same lanes
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
