// Dropout without a stored mask: element i is kept iff draw d = i / group is above p, where draw d
// is word d % 4 of Triton's randint4x(seed, d / 4) as tl.rand4x makes it a float in [0, 1):
// Philox-4x32-10 on the counter (lo, hi, 0, 0) of the 64-bit offset d / 4, keyed by the 64-bit
// seed (lo, hi). One Philox call gives four draws, not tl.rand's one. The mask is a pure function
// of (seed, index), so backward recomputes it, and every backend, thread count and chunking gives
// the same one. group is 1 for dropout and a channel's size for Dropout1d/2d/3d.
//
// Kept elements are multiplied by scale (1/(1-p), rounded as torch rounds it for the dtype),
// dropped ones by 0, like torch's input * noise (so a dropped inf or NaN gives NaN, as in torch).
//
// Philox runs on vectors of 64-bit lanes, each holding one 32-bit word in its low half: a 32x32
// multiply is then one pmuludq whose product gives both halves, and the high halves never need
// clearing (products read only low halves, and the result is truncated).
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "dtypes.h"
#include "kernels.h"
#include "thread_pool.h"

namespace pyfused {
namespace PYFUSED_ISA {

#define PYFUSED_NAME(isa) #isa
#define PYFUSED_NAME_OF(isa) PYFUSED_NAME(isa)
constexpr bool same_name(const char* a, const char* b) {
  return *a == *b && (*a == '\0' || same_name(a + 1, b + 1));
}
// The vector width of this build (csrc/isa_*.cpp): GCC's target pragma sets no __AVX2__ macro.
constexpr int kPhiloxBytes = same_name(PYFUSED_NAME_OF(PYFUSED_ISA), "avx512") ? 64
                             : same_name(PYFUSED_NAME_OF(PYFUSED_ISA), "avx2") ? 32 : 16;
#undef PYFUSED_NAME_OF
#undef PYFUSED_NAME

typedef uint64_t PhiloxLanes __attribute__((vector_size(kPhiloxBytes)));
constexpr int kPhiloxWidth = kPhiloxBytes / 8;

// The full product of the lanes' low halves. GCC 12 does not see that in (a & m) * (b & m), and
// emulates a 64-bit multiply instead: hence the intrinsics (only the one this build runs is
// instantiated, so the baseline build never meets an AVX instruction).
template <int kBytes = kPhiloxBytes>
inline PhiloxLanes mul_low_halves(PhiloxLanes a, PhiloxLanes b) {
#if defined(__x86_64__)
  if constexpr (kBytes == 64) return (PhiloxLanes)_mm512_mul_epu32((__m512i)a, (__m512i)b);
  if constexpr (kBytes == 32) return (PhiloxLanes)_mm256_mul_epu32((__m256i)a, (__m256i)b);
  if constexpr (kBytes == 16) return (PhiloxLanes)_mm_mul_epu32((__m128i)a, (__m128i)b);
#endif
  return (a & 0xffffffffu) * (b & 0xffffffffu);
}

constexpr int kPhiloxRounds = 10;

// Triton's philox_impl for 32-bit words, its round keys computed once per call.
struct PhiloxKey {
  uint64_t k0[kPhiloxRounds], k1[kPhiloxRounds];
  explicit PhiloxKey(uint64_t seed) {
    uint32_t a = uint32_t(seed), b = uint32_t(seed >> 32);
    for (int r = 0; r < kPhiloxRounds; ++r, a += 0x9E3779B9u, b += 0xBB67AE85u) {
      k0[r] = a;
      k1[r] = b;
    }
  }
};

// Vectors of counters run through Philox together: one vector's ten rounds are a chain of
// dependent multiplies (7 cycles a round on Zen 5: multiply 3, shift 2, xor 2), and interleaving
// independent chains keeps the vector units busy. Measured on one core in cache (AMD EPYC, Zen 5):
// 6 chains of 512 bits 7% faster than 4 (8 spill registers), 4 of 256 bits 10% faster than 2, 4
// of 128 bits 20% faster than 2, though some of their registers spill.
constexpr int kStreams = kPhiloxBytes == 64 ? 6 : 4;

typedef uint32_t PhiloxWords __attribute__((vector_size(kPhiloxBytes)));

// The 32-bit words of a and b, each taken from its lanes' low halves, alternating: a's lane 0, b's
// lane 0, a's lane 1, ...
template <size_t... I>
inline PhiloxLanes low_words_paired(PhiloxLanes a, PhiloxLanes b, std::index_sequence<I...>) {
  return (PhiloxLanes)__builtin_shufflevector((PhiloxWords)a, (PhiloxWords)b,
                                              (I % 2 == 0 ? I : 2 * kPhiloxWidth + I - 1)...);
}
// The lanes of a and b alternating, from lane kFirst of each: a[kFirst], b[kFirst], a[kFirst + 1], ...
template <int kFirst, size_t... I>
inline PhiloxLanes lanes_alternating(PhiloxLanes a, PhiloxLanes b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, (I % 2 == 0 ? kFirst + I / 2 : kPhiloxWidth + kFirst + I / 2)...);
}

constexpr int kPhiloxCounters = kStreams * kPhiloxWidth;  // counters per philox_words
constexpr int kPhiloxDraws = 4 * kPhiloxCounters;          // words per philox_words

// words[4 j + k] = output word k of Philox-4x32-10 on the counter (lo, hi, 0, 0) of first + j, for
// j < kPhiloxCounters: Triton's randint4x(seed, first + j). kSameHigh: every counter's hi is
// first's, so round 0 gives every lane the same c0 and round 1 one product for all (fewer vector
// operations).
template <bool kSameHigh>
inline void philox_words(const PhiloxKey& key, uint64_t first, uint32_t* words) {
  constexpr uint64_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  const PhiloxLanes round_a = PhiloxLanes{} + kRoundA, round_b = PhiloxLanes{} + kRoundB;
  PhiloxLanes lane;
  for (int l = 0; l < kPhiloxWidth; ++l) lane[l] = uint64_t(l);
  PhiloxLanes c0[kStreams], c1[kStreams], c2[kStreams], c3[kStreams];
  for (int s = 0; s < kStreams; ++s) {
    c0[s] = (first + uint64_t(s * kPhiloxWidth)) + lane;  // (lo, hi) in each lane
    // Round 0 with c2 = c3 = 0: round_b's product is 0, so c1 becomes 0.
    PhiloxLanes p1 = mul_low_halves(round_a, c0[s]);
    if constexpr (!kSameHigh) c0[s] = (c0[s] >> 32) ^ key.k0[0];
    c2[s] = (p1 >> 32) ^ key.k1[0];
    c3[s] = p1;
  }
  if constexpr (kSameHigh) {
    const uint64_t p1 = kRoundA * uint32_t((first >> 32) ^ key.k0[0]);  // round 1's A * c0, for every lane
    for (int s = 0; s < kStreams; ++s) {
      PhiloxLanes p0 = mul_low_halves(round_b, c2[s]);
      c0[s] = (p0 >> 32) ^ key.k0[1];
      c2[s] = c3[s] ^ ((p1 >> 32) ^ key.k1[1]);
      c1[s] = p0;
      c3[s] = PhiloxLanes{} + p1;
    }
  } else {
    for (int s = 0; s < kStreams; ++s) {
      PhiloxLanes p0 = mul_low_halves(round_b, c2[s]);
      PhiloxLanes p1 = mul_low_halves(round_a, c0[s]);
      c0[s] = (p0 >> 32) ^ key.k0[1];
      c2[s] = (p1 >> 32) ^ c3[s] ^ key.k1[1];
      c1[s] = p0;
      c3[s] = p1;
    }
  }
  for (int r = 2; r < kPhiloxRounds; ++r) {
    for (int s = 0; s < kStreams; ++s) {
      PhiloxLanes p0 = mul_low_halves(round_b, c2[s]);
      PhiloxLanes p1 = mul_low_halves(round_a, c0[s]);
      c0[s] = (p0 >> 32) ^ c1[s] ^ key.k0[r];
      c2[s] = (p1 >> 32) ^ c3[s] ^ key.k1[r];
      c1[s] = p0;
      c3[s] = p1;
    }
  }
  // Each counter's four words, in order: (c0, c1) and (c2, c3) paired per lane, then the pairs
  // of each lane side by side.
  constexpr auto kWords = std::make_index_sequence<2 * kPhiloxWidth>();
  for (int s = 0; s < kStreams; ++s) {
    const PhiloxLanes first_two = low_words_paired(c0[s], c1[s], kWords);
    const PhiloxLanes last_two = low_words_paired(c2[s], c3[s], kWords);
    const PhiloxLanes low = lanes_alternating<0>(first_two, last_two, std::make_index_sequence<kPhiloxWidth>());
    const PhiloxLanes high =
        lanes_alternating<kPhiloxWidth / 2>(first_two, last_two, std::make_index_sequence<kPhiloxWidth>());
    std::memcpy(words + 4 * s * kPhiloxWidth, &low, sizeof low);
    std::memcpy(words + 4 * s * kPhiloxWidth + 2 * kPhiloxWidth, &high, sizeof high);
  }
}

// Triton's uint_to_uniform_float for 32-bit words: the word as an int32 x, folded to
// x < 0 ? ~x : x, in [0, 2^31), times about 2^-31.
inline float uniform_of_folded(uint32_t folded) { return float(int32_t(folded)) * 4.6566127342e-10f; }

// Mask draws computed together, a multiple of 4 (draw d is word d % 4 of the counter d / 4) and
// whole Philox calls for every build.
constexpr int kMaskBlock = 192;
static_assert(kMaskBlock % kPhiloxDraws == 0, "a mask block is whole Philox calls");
constexpr int64_t kDropoutChunk = kMaskBlock * 85;  // elements per unit of work (~16 Ki)

template <class Op>
struct Mask {
  PhiloxKey key;
  // tl.rand's float > p, without a float per draw: uniform_of_folded is monotone, so a draw is
  // kept iff its folded word is at least lowest_kept, that is iff lowest_kept <= word <= 2^32 - 1
  // - lowest_kept: one unsigned comparison, word - lowest_kept < kept_span (mod 2^32).
  uint32_t lowest_kept, kept_span;
  Op scale;

  Mask(uint64_t seed, float p, Op scale) : key(seed), scale(scale) {
    // The smallest folded word whose uniform exceeds p, or 2^31 (nothing kept); p >= 0, so
    // folded 0 (uniform 0) is never kept and lowest_kept >= 1.
    uint32_t lo = 0, hi = uint32_t(1) << 31;
    while (lo < hi) {
      const uint32_t mid = lo + (hi - lo) / 2;
      if (uniform_of_folded(mid) > p) hi = mid; else lo = mid + 1;
    }
    lowest_kept = lo;
    kept_span = uint32_t(0) - 2 * lo;  // 2^32 - 2 lowest_kept, 0 when nothing is kept
  }

  // m[j] = scale if draw first + j is kept, else 0; first is a multiple of 4.
  void multipliers(uint64_t first, Op* m) const {
    uint32_t words[kMaskBlock];
    const uint64_t counter = first / 4;
    const bool same_high = (counter + kMaskBlock / 4 - 1) >> 32 == counter >> 32;  // false where lo wraps
    for (int v = 0; v < kMaskBlock; v += kPhiloxDraws) {
      if (same_high) {
        philox_words<true>(key, counter + v / 4, words + v);
      } else {
        philox_words<false>(key, counter + v / 4, words + v);
      }
    }
    // In locals: m could alias the members, which would keep this loop scalar and branchy.
    const uint32_t lowest = lowest_kept, span = kept_span;
    const Op kept = scale;
    for (int j = 0; j < kMaskBlock; ++j) m[j] = words[j] - lowest < span ? kept : Op(0);
  }
};

// Rounds an opmath value to the storage type and back (what torch's op-by-op 16-bit math does).
template <class T>
inline OpMath<T> rounded(OpMath<T> v) {
  T t;
  store(&t, v);
  return load(&t);
}

// The per-element math: span<kPerElement>(begin, length, m, to) computes elements [begin, begin +
// length) into to[0, length), multiplying element begin + j by m[j] (kPerElement) or by m[0] (a
// channel's, only where kChannels). It reads its inputs at [begin, begin + length) before writing
// to, so to may be where they are (in place).
template <class T>
struct Scale {
  static constexpr bool kChannels = true;
  const T* x;
  template <bool kPerElement>
  void span(int64_t begin, int64_t length, const OpMath<T>* m, T* to) const {
    const T* in = x + begin;
#pragma GCC ivdep
    for (int64_t j = 0; j < length; ++j) store(to + j, load(in + j) * m[kPerElement ? j : 0]);
  }
};

// residual + dropout(x + bias), rounded after each op as torch's unfused expression rounds it.
template <class T, bool kBias>
struct AddResidual {
  static constexpr bool kChannels = false;
  const T* x;
  const T* residual;
  const T* bias;
  int64_t bias_numel;  // bias is added along the last dimension
  template <bool kPerElement>
  void span(int64_t begin, int64_t length, const OpMath<T>* m, T* to) const {
    static_assert(kPerElement, "dropout_add drops elements, not channels");
    for (int64_t done = 0; done < length;) {
      // Pieces that stay within one row of bias.
      const int64_t column = kBias ? (begin + done) % bias_numel : 0;
      const int64_t piece = kBias ? std::min(length - done, bias_numel - column) : length;
      const int64_t at = begin + done;
      const T* b = bias + column;
#pragma GCC ivdep
      for (int64_t j = 0; j < piece; ++j) {
        OpMath<T> v = load(x + at + j);
        if constexpr (kBias) v = rounded<T>(v + load(b + j));
        store(to + done + j, load(residual + at + j) + rounded<T>(v * m[done + j]));
      }
      done += piece;
    }
  }
};

// Outputs of at least this many bytes (not in place) are written with non-temporal stores: they
// outgrow a last-level cache anyway, and streaming skips each line's read for ownership. Measured
// at 16 Mi fp32 (2-core EPYC VM, A/B interleaved): 5-7% faster into a fresh output, about 5% slower
// into an already-written one; outputs this large are nearly always fresh (glibc maps every
// allocation above 32 MiB anew). At 4 Mi fp32 streaming was slower either way.
constexpr size_t kStreamBytes = size_t(32) << 20;

// bytes from src to dst, with non-temporal stores from dst's first vector-aligned byte (kPhiloxBytes
// is this build's vector width). The stores are weakly ordered: the writer sfences before others read.
inline void stream_copy(char* dst, const char* src, size_t bytes) {
#if defined(__x86_64__)
  const size_t head = std::min(bytes, size_t(-reinterpret_cast<uintptr_t>(dst) % kPhiloxBytes));
  std::memcpy(dst, src, head);
  size_t done = head;
  for (; done + kPhiloxBytes <= bytes; done += kPhiloxBytes) {
    if constexpr (kPhiloxBytes == 64) {
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + done), _mm512_loadu_si512(src + done));
    } else if constexpr (kPhiloxBytes == 32) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + done),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + done)));
    } else {
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + done),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + done)));
    }
  }
  std::memcpy(dst + done, src + done, bytes - done);
#else
  std::memcpy(dst, src, bytes);
#endif
}

// Runs math over every element into out, kMaskBlock elements at a time. Each thread owns one
// contiguous range and takes it kDropoutChunk elements at a time from its start: two threads meet
// in at most the pages at their ranges' edges (a fresh output's first touch zeroes 2 MiB pages, and
// a page both fault on makes one wait), and each streams through memory in one direction, as the
// prefetchers like.
// A thread done with its range takes chunks from the others' (a descheduled thread on a shared
// machine would otherwise hold up the call). Large outputs are computed into a cached block, then
// streamed out (kStreamBytes).
template <class T, class Math>
void dropout_apply(const DropoutCall& call, const Math& math, T* out) {
  using Op = OpMath<T>;
  const Mask<Op> mask(call.seed, float(call.p), Op(call.scale));
  const int64_t n = call.numel, group = call.group;
  if (n == 0) return;
  const int threads = int(std::min<int64_t>(call.threads, (n + kDropoutChunk - 1) / kDropoutChunk));
  const int64_t blocks = (n + kMaskBlock - 1) / kMaskBlock;
  const int64_t per_thread = (blocks + threads - 1) / threads * kMaskBlock;
  struct alignas(64) Range {
    std::atomic<int64_t> next;  // the first element no thread has taken yet
    int64_t end;
  };
  std::vector<Range> ranges(threads);
  for (int w = 0; w < threads; ++w) {
    ranges[w].next = std::min(n, w * per_thread);
    ranges[w].end = std::min(n, (w + 1) * per_thread);
  }
#if defined(__x86_64__)
  // In place, every line is read before it is written, so a cached write costs no extra read, and
  // streaming would only evict the line the read brought in (measured: 20% slower on one thread).
  const bool stream = size_t(n) * sizeof(T) >= kStreamBytes && out != call.x && out != call.residual;
#else
  constexpr bool stream = false;
#endif
  parallel_run(threads, [&](int worker) {
    Op m[kMaskBlock];
    alignas(64) T staged[kMaskBlock];
    // compute(block, end, to) computes elements [block, end) into to[0, end - block).
    const auto for_each_block = [&](const auto& compute) {
      for (int k = 0; k < threads; ++k) {
        Range& range = ranges[(worker + k) % threads];
        for (int64_t lo; (lo = range.next.fetch_add(kDropoutChunk, std::memory_order_relaxed)) < range.end;) {
          const int64_t hi = std::min(lo + kDropoutChunk, range.end);
          for (int64_t block = lo; block < hi; block += kMaskBlock) {
            const int64_t end = std::min(block + kMaskBlock, hi);
            compute(block, end, stream ? staged : out + block);
            if (stream) {
              stream_copy(reinterpret_cast<char*>(out + block), reinterpret_cast<const char*>(staged),
                          size_t(end - block) * sizeof(T));
            }
          }
        }
      }
    };
    // Two loops, not one branch per block: one loop with both bodies compiles about 8% slower.
    if (group == 1) {
      for_each_block([&](int64_t block, int64_t end, T* to) {
        mask.multipliers(uint64_t(block), m);
        math.template span<true>(block, end - block, m, to);
      });
    } else if constexpr (Math::kChannels) {
      int64_t first_drawn = -kMaskBlock;  // m holds the draws [first_drawn, first_drawn + kMaskBlock)
      for_each_block([&](int64_t block, int64_t end, T* to) {
        // One draw per channel, kMaskBlock channels drawn at a time from a multiple of 4 (taking
        // another thread's chunk may go back).
        for (int64_t channel = block / group; channel * group < end; ++channel) {
          if (channel < first_drawn || channel >= first_drawn + kMaskBlock) {
            first_drawn = channel & ~int64_t(3);
            mask.multipliers(uint64_t(first_drawn), m);
          }
          const int64_t begin = std::max(block, channel * group), stop = std::min(end, (channel + 1) * group);
          math.template span<false>(begin, stop - begin, m + (channel - first_drawn), to + (begin - block));
        }
      });
    }
#if defined(__x86_64__)
    if (stream) _mm_sfence();
#endif
  });
}

template <class T>
void dropout_for_type(DropoutOp op, const DropoutCall& call) {
  const T* x = static_cast<const T*>(call.x);
  T* out = static_cast<T*>(call.out);
  if (op == DropoutOp::kScale) return dropout_apply<T>(call, Scale<T>{x}, out);
  const T* residual = static_cast<const T*>(call.residual);
  const T* bias = static_cast<const T*>(call.bias);
  if (bias == nullptr) return dropout_apply<T>(call, AddResidual<T, false>{x, residual, bias, 0}, out);
  dropout_apply<T>(call, AddResidual<T, true>{x, residual, bias, call.bias_numel}, out);
}

}  // namespace PYFUSED_ISA
}  // namespace pyfused
