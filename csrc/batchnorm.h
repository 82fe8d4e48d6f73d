// Batch normalization: per-channel statistics, the normalizing pass, and the two backward passes.
//
// A tensor is seen as (outer, channels, inner), element (o, c, i) at (o * C + c) * I + i:
// contiguous N,C,* is (N, C, prod(*)), channels_last is (N * prod(*), C, 1), (N, C) is (N, C, 1).
// Two walks over it:
//   planar  (I >= kPlanarMin): channel c's data are runs of I contiguous elements;
//   rows    (smaller I):       rows of W = C * I contiguous elements, vectorized along the row.
//
// Reductions cut channel c's elements into fixed partitions (a, b): a block of rows (planes in
// the planar walk) times a block of columns of a row (planar) or one column (rows walk). A
// partition's elements fit in cache, so its statistics take two passes over it (sum, then the
// sum of squared deviations from the partition's own mean) for one read from memory. The rows
// walk reduces a tile of adjacent columns at once, one register lane per column. Partitions
// are merged per channel in (a, b) order with the parallel-axis formula
//   mean = sum(S_p) / n,  M2 = sum(M2_p + n_p * (S_p / n_p - mean)^2)
// whose terms are all non-negative. The planar walk accumulates in double: an fp32 element's
// square is exact in double, and the partitions' sums stay exact to ~1e-16 relative, so the
// variance is as good as a two-pass fp64 computation whatever the mean. The rows walk's
// statistics fold short blocks of shifted terms in opmath first (see kBlock for the bound). The cut depends only on the shape,
// so the statistics depend on neither the thread count nor the instruction set.
//
// Per-channel values (mean, inverse std, affine coefficients) travel as double arrays; the
// elementwise passes round them once to opmath (float, or double for fp64) and compute
//   forward  y  = x * scale + shift                  (scale = w * invstd, shift = b - mean * scale)
//   backward dx = ((dy - gm) - (x - mean) * k) * g   (gm = sum dy / n, k = sum dy (x - mean) invstd^2 / n,
//                                                     g = w * invstd; gm = k = 0 in eval mode)
// as torch's CPU kernels do. With a fused ReLU, y = max(x * scale + shift, 0) and dy is masked by
// (x * scale + shift > 0), recomputed from the saved input with the same rounding as forward.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <array>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "dtypes.h"
#include "kernels.h"
#include "norm.h"  // kVectorBytes
#include "thread_pool.h"

namespace pyfused {
namespace PYFUSED_ISA {
namespace batchnorm {

constexpr int kLanes = 16;
constexpr int64_t kPart = 4096;        // elements per statistics partition (16 KiB of fp32)
constexpr int64_t kMinRows = 32;       // rows walk: at least this many rows per partition
constexpr int64_t kPlanarMin = 32;     // inner extent from which the planar walk is used
constexpr int64_t kChunk = 1 << 14;    // elements per unit of elementwise work

// kLanes double accumulators as registers of the build's own width (kVectorBytes, csrc/norm.h):
// lane l is element l % kWidth of register l / kWidth. A single vector type of all kLanes lanes
// is wider than the registers and lives in memory (see csrc/norm.h), costing a store-to-load
// round trip per step.
typedef double Vec __attribute__((vector_size(kVectorBytes)));
constexpr int kWidth = kVectorBytes / int(sizeof(double));
constexpr int kRegisters = kLanes / kWidth;
struct Lanes {
  Vec r[kRegisters];
};

// The partitions of one channel: n_a blocks of rows_per_a rows (planes), times n_b blocks of
// cols_per_b columns. Partition (a, c, b) is stored at (a * C + c) * n_b + b.
struct Plan {
  bool planar;
  int64_t n_a, rows_per_a, n_b, cols_per_b;
  int64_t rows(const BnShape& s, int64_t a) const { return std::min(rows_per_a, s.outer - a * rows_per_a); }
  int64_t cols(const BnShape& s, int64_t b) const { return std::min(cols_per_b, s.inner - b * cols_per_b); }
  int64_t size(const BnShape& s) const { return n_a * s.channels * n_b; }
};

inline Plan plan(const BnShape& s) {
  Plan p;
  p.planar = s.inner >= kPlanarMin;
  if (p.planar) {
    p.cols_per_b = std::min(s.inner, kPart);
    p.n_b = (s.inner + kPart - 1) / kPart;
    p.rows_per_a = p.n_b == 1 ? std::max<int64_t>(1, kPart / s.inner) : 1;
  } else {
    const int64_t width = s.channels * s.inner;
    p.cols_per_b = 1;
    p.n_b = s.inner;
    p.rows_per_a = std::max(kMinRows, kPart / std::max<int64_t>(width, 1));
  }
  p.n_a = (s.outer + p.rows_per_a - 1) / p.rows_per_a;
  return p;
}

// Runs body(item) for item in [0, n) on s.threads threads.
template <class Body>
void parallel_items(const BnShape& s, int64_t n, Body&& body) {
  std::atomic<int64_t> next{0};
  const int threads = int(std::min<int64_t>(s.threads, n));
  parallel_run(threads, [&](int) {
    for (int64_t k; (k = next.fetch_add(1, std::memory_order_relaxed)) < n;) body(k);
  });
}

inline double sum_lanes(const Lanes& v) {
  double total = 0;
  for (int l = 0; l < kLanes; ++l) total += v.r[l / kWidth][l % kWidth];
  return total;
}

// kWidth values of a pass's opmath type (float, or double for fp64): one Vec's worth of elements.
template <class Op>
struct OpVecOf {
  typedef Op type __attribute__((vector_size(kWidth * sizeof(Op))));
};
template <class T>
using OpVec = typename OpVecOf<OpMath<T>>::type;

template <class T>
inline OpVec<T> load_vec(const T* p) {
  OpVec<T> v;
  if constexpr (std::is_same_v<T, OpMath<T>>) {
    std::memcpy(&v, p, sizeof v);
  } else {
    for (int l = 0; l < kWidth; ++l) v[l] = load(p + l);
  }
  return v;
}

// Lane by lane: GCC's __builtin_convertvector splits the float to double conversion in halves.
template <class V>
inline Vec widen(V v) {
  Vec w;
  for (int l = 0; l < kWidth; ++l) w[l] = double(v[l]);
  return w;
}

// Adds the terms of elements [0, n) of the inputs `in` into the lanes of each acc, element j into
// lane j % kLanes: f maps kWidth elements of each input (as OpVecs) to one Vec of terms per
// accumulator. In the tail, f sees zero-padded vectors and only the real lanes are added.
template <int kSums, class T, size_t kIn, class F>
inline void fold(Lanes (&acc)[kSums], const std::array<const T*, kIn>& in, int64_t n, F&& f) {
  Vec a[kSums][kRegisters];
  for (int k = 0; k < kSums; ++k)
    for (int r = 0; r < kRegisters; ++r) a[k][r] = acc[k].r[r];
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma GCC unroll 16
    for (int r = 0; r < kRegisters; ++r) {
      std::array<OpVec<T>, kIn> v;
      for (size_t i = 0; i < kIn; ++i) v[i] = load_vec(in[i] + j + r * kWidth);
      const std::array<Vec, kSums> t = std::apply(f, v);
      for (int k = 0; k < kSums; ++k) a[k][r] += t[k];
    }
  }
  for (int r = 0; r < kRegisters && j + r * kWidth < n; ++r) {
    const int64_t first = j + r * kWidth, count = std::min<int64_t>(kWidth, n - first);
    std::array<OpVec<T>, kIn> v = {};
    for (size_t i = 0; i < kIn; ++i)
      for (int l = 0; l < count; ++l) v[i][l] = load(in[i] + first + l);
    const std::array<Vec, kSums> t = std::apply(f, v);
    for (int k = 0; k < kSums; ++k)
      for (int l = 0; l < count; ++l) a[k][r][l] += t[k][l];
  }
  for (int k = 0; k < kSums; ++k)
    for (int r = 0; r < kRegisters; ++r) acc[k].r[r] = a[k][r];
}

// Rows walk: a tile of up to kTile columns down a block of rows, each column's sum in its own
// double lane (register r holds columns r * kWidth + l), in the same order whatever the tile's
// width. A narrower last tile is zero-padded; its padding lanes are never read.
constexpr int kTileRegisters = 8;
constexpr int64_t kTile = kTileRegisters * kWidth;
typedef Vec Tile[kTileRegisters];

// The rows walk's statistics fold a tile's columns in opmath lanes of full registers (twice
// kWidth floats for the 16- and 32-bit types) over blocks of kBlock rows, and widen each block's
// sums into the tile's double lanes: half the instructions of widening every element. A block's
// opmath sum of k <= kBlock terms t_i is off by at most (k - 1) * eps * sum |t_i| (eps: opmath's
// unit roundoff, 2^-24 for float), so every term is shifted first to keep sum |t_i| small: by the
// block's first row for the mean, by the partition's mean rounded to opmath for the squared
// deviations, whose double correction makes M2 exact to that bound whatever the mean.
constexpr int64_t kBlock = 8;

template <class Op>
struct WideOf {
  typedef Op type __attribute__((vector_size(kVectorBytes)));
};
template <class T>
using Wide = typename WideOf<OpMath<T>>::type;
template <class T>
constexpr int kWideLanes = kVectorBytes / int(sizeof(OpMath<T>));
template <class T>
constexpr int kWideRegisters = int(kTile) / kWideLanes<T>;

// Elements [0, n) from p as a Wide's first lanes, in opmath; zeros past n.
template <class T>
inline Wide<T> load_wide(const T* p, int64_t n) {
  Wide<T> v = {};
  if constexpr (std::is_same_v<T, OpMath<T>>) {
    if (n >= kWideLanes<T>) {
      std::memcpy(&v, p, sizeof v);
      return v;
    }
  }
  for (int l = 0; l < kWideLanes<T> && l < n; ++l) v[l] = load(p + l);
  return v;
}

// acc[h] += lanes [h * kWidth, (h + 1) * kWidth) of v, widened.
template <class V>
inline void add_widened(Vec* acc, V v) {
  constexpr int n = int(sizeof(V) / sizeof(v[0]));
  for (int h = 0; h < n / kWidth; ++h) {
    Vec w;
    for (int l = 0; l < kWidth; ++l) w[l] = double(v[h * kWidth + l]);
    acc[h] += w;
  }
}

// Rows walk: per column of a tile of n <= kTile columns, the sum over rows [0, rows) of
// f(q, v...) (q: the tile's Wide register, v: that register of each input), folded as above.
template <int kSums, class T, size_t kIn, class F>
inline void fold_tile_blocks(Tile (&acc)[kSums], const std::array<const T*, kIn>& in, int64_t rows, int64_t stride,
                             int64_t n, F&& f) {
  constexpr int kQ = kWideRegisters<T>;
  using W = Wide<T>;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    const int64_t r1 = std::min(rows, r0 + kBlock);
    W block[kSums][kQ] = {};
    auto add = [&](int q, const std::array<W, kIn>& v) {
      const std::array<W, kSums> t = std::apply([&](auto... u) { return f(q, u...); }, v);
      for (int k = 0; k < kSums; ++k) block[k][q] += t[k];
    };
    if (n == kTile) {
      for (int64_t row = r0; row < r1; ++row) {
#pragma GCC unroll 16
        for (int q = 0; q < kQ; ++q) {
          std::array<W, kIn> v;
          for (size_t i = 0; i < kIn; ++i) v[i] = load_wide(in[i] + row * stride + q * kWideLanes<T>, kWideLanes<T>);
          add(q, v);
        }
      }
    } else {
      for (int64_t row = r0; row < r1; ++row) {
        for (int q = 0; q * kWideLanes<T> < n; ++q) {
          std::array<W, kIn> v;
          for (size_t i = 0; i < kIn; ++i)
            v[i] = load_wide(in[i] + row * stride + q * kWideLanes<T>, n - q * kWideLanes<T>);
          add(q, v);
        }
      }
    }
    for (int k = 0; k < kSums; ++k)
      for (int q = 0; q < kQ; ++q) add_widened(acc[k] + q * (kWideLanes<T> / kWidth), block[k][q]);
  }
}

// A zeroed heap array of n register-aligned accumulators (trivial types of vector members);
// std::vector's storage was not aligned for them (64 bytes) here.
template <class A>
class ZeroedArray {
 public:
  static_assert(std::is_trivial_v<A>, "zeroed bytes must be a valid A");
  explicit ZeroedArray(int64_t n) : bytes_(size_t(n) * sizeof(A) + alignof(A), 0) {
    const uintptr_t at = reinterpret_cast<uintptr_t>(bytes_.data());
    data_ = reinterpret_cast<A*>((at + alignof(A) - 1) & ~uintptr_t(alignof(A) - 1));
  }
  A& operator[](int64_t i) { return data_[i]; }

 private:
  std::vector<unsigned char> bytes_;
  A* data_;
};

// Planar walk: partition `item`'s S = sum x and M2 = sum (x - S / n)^2, into s1, s2.
template <class T>
void stats_partition(const BnShape& s, const Plan& p, const T* x, int64_t item, double* s1, double* s2) {
  const int64_t C = s.channels, I = s.inner, W = C * I;
  const int64_t b = item % p.n_b, c = item / p.n_b % C, a = item / p.n_b / C;
  const int64_t rows = p.rows(s, a), cols = p.cols(s, b);
  const T* base = x + (a * p.rows_per_a * C + c) * I + b * p.cols_per_b;
  Lanes sum[1] = {};
  for (int64_t r = 0; r < rows; ++r) {
    const T* seg = base + r * W;
    fold(sum, std::array<const T*, 1>{seg}, cols, [](OpVec<T> v) { return std::array<Vec, 1>{widen(v)}; });
  }
  const double mean = sum_lanes(sum[0]) / double(rows * cols);
  Lanes m2[1] = {};
  for (int64_t r = 0; r < rows; ++r) {
    const T* seg = base + r * W;
    fold(m2, std::array<const T*, 1>{seg}, cols, [&](OpVec<T> v) {
      const Vec d = widen(v) - mean;
      return std::array<Vec, 1>{d * d};
    });
  }
  s1[item] = sum_lanes(sum[0]);
  s2[item] = sum_lanes(m2[0]);
}

// Per-partition sums S and M2, written to s1, s2 in plan order.
template <class T>
void partition_stats(const BnShape& s, const Plan& p, const T* x, double* s1, double* s2) {
  const int64_t W = s.channels * s.inner;
  if (p.planar) {
    parallel_items(s, p.size(s), [&](int64_t item) { stats_partition(s, p, x, item, s1, s2); });
  } else {
    // Row-major: a block of kBlock rows across every tile of columns, then the next block, so the
    // rows are read in memory order, not a tile at a time down the rows at a stride of a whole
    // row. Each tile's sums wait in memory between blocks; every column's terms are added in the
    // same order as tile by tile. The partition's rows are still in cache for the second pass.
    using Op = OpMath<T>;
    constexpr int kQ = kWideRegisters<T>;
    struct TileStats {
      Tile sum[1], m2[1];
      Wide<T> mean_op[kQ];  // the second pass's shift: the mean in opmath
    };
    const int64_t tiles = (W + kTile - 1) / kTile;
    parallel_items(s, p.n_a, [&](int64_t a) {
      const int64_t rows = p.rows(s, a);
      const T* base = x + a * p.rows_per_a * W;
      ZeroedArray<TileStats> acc(tiles);
      for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
        const int64_t k = std::min(kBlock, rows - r0);
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t w = t * kTile, n = std::min<int64_t>(kTile, W - w);
          const T* tile = base + r0 * W + w;
          Wide<T> first[kQ];  // the block's shift: its first row
          for (int q = 0; q < kQ; ++q) first[q] = load_wide(tile + q * kWideLanes<T>, n - q * kWideLanes<T>);
          Tile block[1] = {};
          fold_tile_blocks(block, std::array<const T*, 1>{tile}, k, W, n,
                           [&](int q, Wide<T> v) { return std::array<Wide<T>, 1>{v - first[q]}; });
          Tile shift = {};
          for (int q = 0; q < kQ; ++q) add_widened(shift + q * (kWideLanes<T> / kWidth), first[q]);
          for (int r = 0; r < kTileRegisters; ++r) acc[t].sum[0][r] += shift[r] * double(k) + block[0][r];
        }
      }
      for (int64_t t = 0; t < tiles; ++t) {
        Tile mean;
        for (int r = 0; r < kTileRegisters; ++r) mean[r] = acc[t].sum[0][r] / double(rows);
#pragma GCC unroll 64
        for (int col = 0; col < kTile; ++col)
          acc[t].mean_op[col / kWideLanes<T>][col % kWideLanes<T>] = Op(mean[col / kWidth][col % kWidth]);
      }
      for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t w = t * kTile, n = std::min<int64_t>(kTile, W - w);
          const Wide<T>* mean_op = acc[t].mean_op;
          fold_tile_blocks(acc[t].m2, std::array<const T*, 1>{base + r0 * W + w}, std::min(kBlock, rows - r0), W, n,
                           [&](int q, Wide<T> v) {
                             const Wide<T> d = v - mean_op[q];
                             return std::array<Wide<T>, 1>{d * d};
                           });
        }
      }
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t w = t * kTile, n = std::min<int64_t>(kTile, W - w);
        // sum (x - m')^2 = M2 + rows * (mean - m')^2 for the shift m' = mean rounded to opmath.
        Tile shift = {};
        for (int q = 0; q < kQ; ++q) add_widened(shift + q * (kWideLanes<T> / kWidth), acc[t].mean_op[q]);
        for (int r = 0; r < kTileRegisters; ++r) {
          const Vec d = acc[t].sum[0][r] / double(rows) - shift[r], dev = acc[t].m2[0][r] - double(rows) * d * d;
          acc[t].m2[0][r] = dev < 0 ? Vec{} : dev;  // rounding below 0; NaN stays NaN
        }
        std::memcpy(s1 + a * W + w, acc[t].sum[0], n * sizeof(double));  // a Tile's lanes are its columns in order
        std::memcpy(s2 + a * W + w, acc[t].m2[0], n * sizeof(double));
      }
    });
  }
}

// Channel c's total of a per-partition value, for c in [c0, c1), in plan order; the channels'
// loop, innermost, vectorizes.
inline void channel_totals(const BnShape& s, const Plan& p, const double* parts, int64_t c0, int64_t c1,
                           double* out) {
  std::fill(out + c0, out + c1, 0.0);
  for (int64_t a = 0; a < p.n_a; ++a)
    for (int64_t b = 0; b < p.n_b; ++b)
      for (int64_t c = c0; c < c1; ++c) out[c] += parts[(a * s.channels + c) * p.n_b + b];
}

// Channel c's mean and M2 from its partitions, for c in [c0, c1), merged in plan order.
inline void merge_stats(const BnShape& s, const Plan& p, const double* s1, const double* s2, int64_t c0,
                        int64_t c1, double* mean, double* m2) {
  const double n = double(s.outer) * double(s.inner);
  channel_totals(s, p, s1, c0, c1, mean);
  for (int64_t c = c0; c < c1; ++c) mean[c] /= n;
  std::fill(m2 + c0, m2 + c1, 0.0);
  for (int64_t a = 0; a < p.n_a; ++a) {
    for (int64_t b = 0; b < p.n_b; ++b) {
      const double count = double(p.rows(s, a) * p.cols(s, b));
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t k = (a * s.channels + c) * p.n_b + b;
        const double d = s1[k] / count - mean[c];
        m2[c] += s2[k] + count * d * d;
      }
    }
  }
}

template <class T>
void stats(const BnShape& s, const void* x, double* mean, double* m2) {
  const Plan p = plan(s);
  std::vector<double> s1(p.size(s)), s2(p.size(s));
  partition_stats(s, p, static_cast<const T*>(x), s1.data(), s2.data());
  merge_stats(s, p, s1.data(), s2.data(), 0, s.channels, mean, m2);
}

// Per-channel coefficients, rounded to opmath once, expanded to one per column in the rows walk;
// zero-padded to whole tiles, which the rows walk's reductions load.
// Filled channel by channel: a division per column cost (256, 1024)'s grad_input pass ~10%.
template <class Op>
std::vector<Op> per_column(const BnShape& s, bool planar, const double* values) {
  const int64_t repeat = planar ? 1 : s.inner, n = s.channels * repeat;
  std::vector<Op> out((n + kTile - 1) / kTile * kTile);
  for (int64_t c = 0; c < s.channels; ++c) std::fill_n(out.data() + c * repeat, repeat, Op(values[c]));
  return out;
}

// Calls body(begin, length, column) for every run of elements in [0, numel) that shares one
// segment: a plane (column = its channel, constant over the run) in the planar walk, a row
// (column = the run's first column, increasing along it) in the rows walk.
template <class Body>
void for_each_run(const BnShape& s, bool planar, Body&& body) {
  const int64_t numel = s.outer * s.channels * s.inner;
  const int64_t width = planar ? s.inner : s.channels * s.inner;
  parallel_items(s, (numel + kChunk - 1) / kChunk, [&](int64_t item) {
    const int64_t end = std::min(numel, (item + 1) * kChunk);
    for (int64_t e = item * kChunk; e < end;) {
      const int64_t segment = e / width, offset = e % width;
      const int64_t length = std::min(end - e, width - offset);
      body(e, length, planar ? segment % s.channels : offset);
      e += length;
    }
  });
}

template <class Op>
inline Op affine_relu(Op v, bool relu) { return relu && v < Op(0) ? Op(0) : v; }  // NaN stays NaN

// n contiguous elements of one channel.
template <class T, bool kRelu>
inline void normalize_plane(const T* in, T* out, int64_t n, OpMath<T> sa, OpMath<T> sb) {
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) store(out + j, affine_relu(load(in + j) * sa + sb, kRelu));
}

template <class T, bool kRelu>
void normalize_typed(const BnShape& s, const T* x, T* y, const double* scale, const double* shift) {
  using Op = OpMath<T>;
  const bool planar = plan(s).planar;
  const std::vector<Op> a = per_column<Op>(s, planar, scale), b = per_column<Op>(s, planar, shift);
  for_each_run(s, planar, [&](int64_t e, int64_t n, int64_t col) {
    const T* in = x + e;
    T* out = y + e;
    if (planar) {
      normalize_plane<T, kRelu>(in, out, n, a[col], b[col]);
    } else {
      const Op* pa = a.data() + col;
      const Op* pb = b.data() + col;
#pragma GCC ivdep
      for (int64_t j = 0; j < n; ++j) store(out + j, affine_relu(load(in + j) * pa[j] + pb[j], kRelu));
    }
  });
}

template <class T>
void normalize(const BnShape& s, const void* x, void* y, const double* scale, const double* shift, bool relu) {
  if (relu) return normalize_typed<T, true>(s, static_cast<const T*>(x), static_cast<T*>(y), scale, shift);
  normalize_typed<T, false>(s, static_cast<const T*>(x), static_cast<T*>(y), scale, shift);
}

// dy, masked by the forward's ReLU when there is one: x * scale + shift rounds as in forward.
// Op: a scalar or an OpVec (whose comparison selects lane by lane); scale and shift are scalars.
template <class Op, bool kRelu, class S>
inline Op masked(Op dy, Op x, S scale, S shift) {
  if constexpr (kRelu) {
    const Op zero = {};
    return x * scale + shift > zero ? dy : zero;
  }
  return dy;
}

// Planar walk: partition `item`'s sum dy and sum dy * (x - m), into s1, s2.
template <class T, bool kRelu>
void grad_partition(const BnShape& s, const Plan& p, const T* dy, const T* x, int64_t item, OpMath<T> sa,
                    OpMath<T> sb, double m, double* s1, double* s2) {
  const int64_t C = s.channels, I = s.inner, W = C * I;
  const int64_t pb = item % p.n_b, c = item / p.n_b % C, pa = item / p.n_b / C;
  const int64_t rows = p.rows(s, pa), cols = p.cols(s, pb);
  const int64_t start = (pa * p.rows_per_a * C + c) * I + pb * p.cols_per_b;
  Lanes sums[2] = {};
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = dy + start + r * W;
    const T* v = x + start + r * W;
    fold(sums, std::array<const T*, 2>{g, v}, cols, [&](OpVec<T> gv, OpVec<T> xv) {
      const Vec d = widen(masked<OpVec<T>, kRelu>(gv, xv, sa, sb));
      return std::array<Vec, 2>{d, d * (widen(xv) - m)};
    });
  }
  s1[item] = sum_lanes(sums[0]);
  s2[item] = sum_lanes(sums[1]);
}

// Per-channel sum dy and sum dy * (x - mean), over the same partitions as the statistics.
template <class T, bool kRelu>
void grad_sums_typed(const BnShape& s, const T* dy, const T* x, const double* mean, const double* scale,
                     const double* shift, double* sum_dy, double* sum_dy_xmu) {
  using Op = OpMath<T>;
  const Plan p = plan(s);
  const int64_t C = s.channels, I = s.inner, W = C * I;
  const std::vector<Op> a = per_column<Op>(s, p.planar, scale), b = per_column<Op>(s, p.planar, shift);
  const std::vector<double> mu = per_column<double>(s, p.planar, mean);
  std::vector<double> s1(p.size(s)), s2(p.size(s));
  if (p.planar) {
    parallel_items(s, p.size(s), [&](int64_t item) {
      const int64_t c = item / p.n_b % C;
      grad_partition<T, kRelu>(s, p, dy, x, item, a[c], b[c], mu[c], s1.data(), s2.data());
    });
  } else {
    // Folded as the statistics (kBlock): sum dy unshifted, within (k - 1) eps sum |dy| per block;
    // dy * (x - m') with m' the mean in opmath, corrected in double by (m' - mean) * sum dy.
    constexpr int kQ = kWideRegisters<T>;
    const std::vector<Op> mu_op = per_column<Op>(s, p.planar, mean);
    // Row-major, as the statistics: a block of kBlock rows across every tile, each tile's sums in
    // memory between blocks.
    struct TileSums {
      Tile sums[2];
    };
    const int64_t tiles = (W + kTile - 1) / kTile;
    parallel_items(s, p.n_a, [&](int64_t pa) {
      const int64_t start = pa * p.rows_per_a * W, rows = p.rows(s, pa);
      ZeroedArray<TileSums> acc(tiles);
      for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
        for (int64_t t = 0; t < tiles; ++t) {
          const int64_t w = t * kTile, n = std::min<int64_t>(kTile, W - w);
          Wide<T> sa[kQ], sb[kQ], m[kQ];  // per-column arrays, zero-padded to whole tiles
          for (int q = 0; q < kQ; ++q) {
            std::memcpy(&sa[q], a.data() + w + q * kWideLanes<T>, sizeof sa[q]);
            std::memcpy(&sb[q], b.data() + w + q * kWideLanes<T>, sizeof sb[q]);
            std::memcpy(&m[q], mu_op.data() + w + q * kWideLanes<T>, sizeof m[q]);
          }
          const int64_t at = start + r0 * W + w;
          fold_tile_blocks(acc[t].sums, std::array<const T*, 2>{dy + at, x + at}, std::min(kBlock, rows - r0), W, n,
                           [&](int q, Wide<T> gv, Wide<T> xv) {
                             const Wide<T> d = masked<Wide<T>, kRelu>(gv, xv, sa[q], sb[q]);
                             return std::array<Wide<T>, 2>{d, d * (xv - m[q])};
                           });
        }
      }
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t w = t * kTile, n = std::min<int64_t>(kTile, W - w);
        Wide<T> m[kQ];
        for (int q = 0; q < kQ; ++q) std::memcpy(&m[q], mu_op.data() + w + q * kWideLanes<T>, sizeof m[q]);
        Tile shift = {}, mu_tile;
        for (int q = 0; q < kQ; ++q) add_widened(shift + q * (kWideLanes<T> / kWidth), m[q]);
        std::memcpy(mu_tile, mu.data() + w, sizeof mu_tile);
        Tile* sums = acc[t].sums;
        for (int r = 0; r < kTileRegisters; ++r) sums[1][r] += (shift[r] - mu_tile[r]) * sums[0][r];
        std::memcpy(s1.data() + pa * W + w, sums[0], n * sizeof(double));
        std::memcpy(s2.data() + pa * W + w, sums[1], n * sizeof(double));
      }
    });
  }
  channel_totals(s, p, s1.data(), 0, C, sum_dy);
  channel_totals(s, p, s2.data(), 0, C, sum_dy_xmu);
}

template <class T>
void grad_sums(const BnShape& s, const void* dy, const void* x, const double* mean, const double* scale,
               const double* shift, bool relu, double* sum_dy, double* sum_dy_xmu) {
  auto g = static_cast<const T*>(dy);
  auto v = static_cast<const T*>(x);
  if (relu) return grad_sums_typed<T, true>(s, g, v, mean, scale, shift, sum_dy, sum_dy_xmu);
  grad_sums_typed<T, false>(s, g, v, mean, scale, shift, sum_dy, sum_dy_xmu);
}

template <class Op, bool kRelu, bool kTraining>
inline Op grad_input_one(Op dy, Op x, Op m, Op gm, Op k, Op g, Op sa, Op sb) {
  const Op d = masked<Op, kRelu>(dy, x, sa, sb);
  if constexpr (kTraining) return ((d - gm) - (x - m) * k) * g;
  return d * g;
}

// n contiguous elements of one channel; k: its six coefficients, rounded to opmath.
template <class T, bool kRelu, bool kTraining>
inline void grad_input_plane(const T* g, const T* v, T* out, int64_t n, const OpMath<T> (&k)[6]) {
  using Op = OpMath<T>;
  const Op m = k[0], gm = k[1], kk = k[2], gg = k[3], sa = k[4], sb = k[5];
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j)
    store(out + j, grad_input_one<Op, kRelu, kTraining>(load(g + j), load(v + j), m, gm, kk, gg, sa, sb));
}

// coefficients: [mean, gm, k, g, scale, shift] x C doubles (see the top of this file).
template <class T, bool kRelu, bool kTraining>
void grad_input_typed(const BnShape& s, const T* dy, const T* x, T* dx, const double* coefficients) {
  using Op = OpMath<T>;
  const int64_t C = s.channels;
  const bool planar = plan(s).planar;
  std::vector<Op> k[6];
  for (int r = 0; r < 6; ++r) k[r] = per_column<Op>(s, planar, coefficients + r * C);
  for_each_run(s, planar, [&](int64_t e, int64_t n, int64_t col) {
    const T* g = dy + e;
    const T* v = x + e;
    T* out = dx + e;
    if (planar) {
      const Op coefficient[6] = {k[0][col], k[1][col], k[2][col], k[3][col], k[4][col], k[5][col]};
      grad_input_plane<T, kRelu, kTraining>(g, v, out, n, coefficient);
    } else {
      const Op* m = k[0].data() + col;
      const Op* gm = k[1].data() + col;
      const Op* kk = k[2].data() + col;
      const Op* gg = k[3].data() + col;
      const Op* sa = k[4].data() + col;
      const Op* sb = k[5].data() + col;
#pragma GCC ivdep
      for (int64_t j = 0; j < n; ++j)
        store(out + j, grad_input_one<Op, kRelu, kTraining>(load(g + j), load(v + j), m[j], gm[j], kk[j], gg[j],
                                                            sa[j], sb[j]));
    }
  });
}

template <class T>
void grad_input(const BnShape& s, const void* dy, const void* x, void* dx, const double* coefficients,
                bool relu, bool training) {
  auto g = static_cast<const T*>(dy);
  auto v = static_cast<const T*>(x);
  auto out = static_cast<T*>(dx);
  if (relu && training) return grad_input_typed<T, true, true>(s, g, v, out, coefficients);
  if (relu) return grad_input_typed<T, true, false>(s, g, v, out, coefficients);
  if (training) return grad_input_typed<T, false, true>(s, g, v, out, coefficients);
  grad_input_typed<T, false, false>(s, g, v, out, coefficients);
}

// --- per-channel steps, in double; P is the parameters' and running stats' storage type ---

template <class P>
inline double load_or(const void* p, int64_t c, double otherwise) {
  return p ? double(load(static_cast<const P*>(p) + c)) : otherwise;
}

// The forward's affine coefficients; backward recomputes them (for the ReLU mask) bit for bit.
template <class P>
inline void affine(const void* weight, const void* bias, int64_t c, double mean, double invstd,
                   double* scale, double* shift) {
  *scale = load_or<P>(weight, c, 1) * invstd;
  *shift = load_or<P>(bias, c, 0) - mean * *scale;
}

// Forward: from `groups` sets of (count, mean, M2) per channel (one per process; none in eval
// mode, where the running stats are used) to save_mean, save_invstd, scale and shift, and the
// running stats' update (torch's: momentum blend, unbiased variance).
template <class P>
void finalize_channels(const BnFinalize& f, int64_t begin, int64_t end) {
  for (int64_t c = begin; c < end; ++c) {
    double mean, var;
    if (f.groups == 0) {
      mean = load_or<P>(f.running_mean, c, 0);
      var = load_or<P>(f.running_var, c, 1);
    } else {
      double n = 0, total = 0;
      for (int64_t g = 0; g < f.groups; ++g) {
        if (f.counts[g] == 0) continue;  // a process with an empty batch has no mean
        n += f.counts[g];
        total += f.counts[g] * f.means[g * f.channels + c];
      }
      mean = total / n;
      double dev = 0;
      for (int64_t g = 0; g < f.groups; ++g) {
        if (f.counts[g] == 0) continue;
        const double d = f.means[g * f.channels + c] - mean;
        dev += f.m2s[g * f.channels + c] + f.counts[g] * d * d;
      }
      var = dev / n;
      if (f.running_mean) {
        P* rm = static_cast<P*>(f.running_mean) + c;
        store(rm, OpMath<P>(f.momentum * mean + (1 - f.momentum) * double(load(rm))));
      }
      if (f.running_var) {
        P* rv = static_cast<P*>(f.running_var) + c;
        store(rv, OpMath<P>(f.momentum * (dev / (n - 1)) + (1 - f.momentum) * double(load(rv))));
      }
    }
    const double invstd = 1 / std::sqrt(var + f.eps);
    f.save_mean[c] = mean;
    f.save_invstd[c] = invstd;
    affine<P>(f.weight, f.bias, c, mean, invstd, f.scale + c, f.shift + c);
  }
}

// Backward: dweight and dbias (when wanted) and the grad_input coefficients.
template <class P>
void backward_finalize_channels(const BnBackwardFinalize& f, int64_t begin, int64_t end) {
  const int64_t C = f.channels;
  for (int64_t c = begin; c < end; ++c) {
    const double invstd = f.invstd[c];
    if (f.dweight) store(static_cast<P*>(f.dweight) + c, OpMath<P>(f.sum_dy_xmu[c] * invstd));
    if (f.dbias) store(static_cast<P*>(f.dbias) + c, OpMath<P>(f.sum_dy[c]));
    double* out = f.coefficients;
    out[c] = f.mean[c];
    out[C + c] = f.training ? f.sum_dy[c] / f.count : 0.0;
    out[2 * C + c] = f.training ? f.sum_dy_xmu[c] * invstd * invstd / f.count : 0.0;
    affine<P>(f.weight, f.bias, c, f.mean[c], invstd, out + 4 * C + c, out + 5 * C + c);
    out[3 * C + c] = out[4 * C + c];  // g = w * invstd is the forward's scale
  }
}

template <class P>
void finalize(const BnFinalize& f) { finalize_channels<P>(f, 0, f.channels); }

template <class P>
void backward_finalize(const BnBackwardFinalize& f) { backward_finalize_channels<P>(f, 0, f.channels); }

// --- one call per forward and per backward ---
//
// In the planar walk, with channels enough to share among the threads and a channel's data
// small enough to stay in a core's cache, one thread takes a channel through every step of a
// pass: its statistics, their finalization and its normalization (forward); its grad sums,
// dweight and dbias, and its dx (backward). The second read of its data then comes from cache,
// not memory. The partitions, their sums and the merge order are the stand-alone passes' own, so
// the results are bit for bit the same either way.
constexpr int64_t kChannelBytes = int64_t(1) << 20;  // a channel's inputs, read twice

inline bool by_channel(const BnShape& s, const Plan& p, int64_t bytes_per_element) {
  return p.planar && s.channels >= 4 * int64_t(s.threads) &&
         s.outer * s.inner * bytes_per_element <= kChannelBytes;
}

typedef void (*FinalizeChannels)(const BnFinalize&, int64_t begin, int64_t end);
typedef void (*BackwardFinalizeChannels)(const BnBackwardFinalize&, int64_t begin, int64_t end);

// f: finalize's arguments but the statistics (groups 1 in training, with counts[0] the count;
// 0 in eval), which come from x. Needs outer * inner > 0.
template <class T, bool kRelu>
void forward_typed(const BnShape& s, const T* x, T* y, BnFinalize f, FinalizeChannels finalize) {
  using Op = OpMath<T>;
  const int64_t C = s.channels, I = s.inner;
  const bool training = f.groups > 0;
  const Plan p = plan(s);
  std::vector<double> mean(training ? C : 0), m2(training ? C : 0);
  f.means = mean.data();
  f.m2s = m2.data();
  // In eval, with no statistics to read first, one pass in memory order.
  if (!training || !by_channel(s, p, sizeof(T))) {
    if (training) stats<T>(s, x, mean.data(), m2.data());
    finalize(f, 0, C);
    return normalize_typed<T, kRelu>(s, x, y, f.scale, f.shift);
  }
  std::vector<double> s1(training ? p.size(s) : 0), s2(training ? p.size(s) : 0);
  parallel_items(s, C, [&](int64_t c) {
    if (training) {
      for (int64_t a = 0; a < p.n_a; ++a)
        for (int64_t b = 0; b < p.n_b; ++b) stats_partition(s, p, x, (a * C + c) * p.n_b + b, s1.data(), s2.data());
      merge_stats(s, p, s1.data(), s2.data(), c, c + 1, mean.data(), m2.data());
    }
    finalize(f, c, c + 1);
    const Op sa = Op(f.scale[c]), sb = Op(f.shift[c]);
    for (int64_t o = 0; o < s.outer; ++o) normalize_plane<T, kRelu>(x + (o * C + c) * I, y + (o * C + c) * I, I, sa, sb);
  });
}

template <class T>
void forward(const BnShape& s, const void* x, void* y, const BnFinalize& f, FinalizeChannels finalize, bool relu) {
  auto in = static_cast<const T*>(x);
  auto out = static_cast<T*>(y);
  if (relu) return forward_typed<T, true>(s, in, out, f, finalize);
  forward_typed<T, false>(s, in, out, f, finalize);
}

// f: backward_finalize's arguments but the sums and the coefficients, which come from dy and x;
// scale, shift: the forward's (for the ReLU mask). dx may be null (no input grad wanted); the
// grad sums are skipped when nothing needs them (eval mode without dweight and dbias).
template <class T, bool kRelu, bool kTraining>
void backward_typed(const BnShape& s, const T* dy, const T* x, T* dx, BnBackwardFinalize f,
                    BackwardFinalizeChannels finish, const double* scale, const double* shift) {
  using Op = OpMath<T>;
  const int64_t C = s.channels, I = s.inner;
  const Plan p = plan(s);
  const bool sums_needed = (kTraining && dx) || f.dweight || f.dbias;
  const bool any = s.outer * s.inner > 0;
  std::vector<double> sums(2 * C, 0.0), coefficients(6 * C);
  f.sum_dy = sums.data();
  f.sum_dy_xmu = sums.data() + C;
  f.coefficients = coefficients.data();
  if (!any || !by_channel(s, p, 2 * sizeof(T))) {
    if (any && sums_needed) grad_sums_typed<T, kRelu>(s, dy, x, f.mean, scale, shift, sums.data(), sums.data() + C);
    finish(f, 0, C);
    if (any && dx) grad_input_typed<T, kRelu, kTraining>(s, dy, x, dx, coefficients.data());
    return;
  }
  std::vector<double> s1(sums_needed ? p.size(s) : 0), s2(sums_needed ? p.size(s) : 0);
  parallel_items(s, C, [&](int64_t c) {
    if (sums_needed) {
      for (int64_t a = 0; a < p.n_a; ++a) {
        for (int64_t b = 0; b < p.n_b; ++b) {
          grad_partition<T, kRelu>(s, p, dy, x, (a * C + c) * p.n_b + b, Op(scale[c]), Op(shift[c]), f.mean[c],
                                   s1.data(), s2.data());
        }
      }
      channel_totals(s, p, s1.data(), c, c + 1, sums.data());
      channel_totals(s, p, s2.data(), c, c + 1, sums.data() + C);
    }
    finish(f, c, c + 1);
    if (!dx) return;
    Op k[6];
    for (int r = 0; r < 6; ++r) k[r] = Op(coefficients[r * C + c]);
    for (int64_t o = 0; o < s.outer; ++o) {
      const int64_t at = (o * C + c) * I;
      grad_input_plane<T, kRelu, kTraining>(dy + at, x + at, dx + at, I, k);
    }
  });
}

template <class T>
void backward(const BnShape& s, const void* dy, const void* x, void* dx, const BnBackwardFinalize& f,
              BackwardFinalizeChannels finish, const double* scale, const double* shift, bool relu) {
  auto g = static_cast<const T*>(dy);
  auto v = static_cast<const T*>(x);
  auto out = static_cast<T*>(dx);
  if (relu && f.training) return backward_typed<T, true, true>(s, g, v, out, f, finish, scale, shift);
  if (relu) return backward_typed<T, true, false>(s, g, v, out, f, finish, scale, shift);
  if (f.training) return backward_typed<T, false, true>(s, g, v, out, f, finish, scale, shift);
  backward_typed<T, false, false>(s, g, v, out, f, finish, scale, shift);
}

}  // namespace batchnorm
}  // namespace PYFUSED_ISA
}  // namespace pyfused
