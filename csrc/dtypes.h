// Storage types and their conversion to and from the type the math runs in ("opmath").
//
// The conversions are written with integer and float operations only, without branches, so the
// compiler vectorizes loops that use them for every instruction set (F16C's conversion intrinsics
// are not auto-vectorized by GCC). Both round to nearest even, as torch's c10::Half and
// c10::BFloat16 do, so a value stored here reads back identical to one stored by torch.
#pragma once

#include <cstdint>
#include <cstring>

namespace pyfused {
namespace PYFUSED_ISA {

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

template <class T> struct OpMathOf { using type = float; };
template <> struct OpMathOf<double> { using type = double; };
template <class T> using OpMath = typename OpMathOf<T>::type;

inline float bits_to_float(uint32_t u) { return __builtin_bit_cast(float, u); }
inline uint32_t float_to_bits(float f) { return __builtin_bit_cast(uint32_t, f); }

inline float load(const float* p) { return *p; }
inline double load(const double* p) { return *p; }
inline void store(float* p, float v) { *p = v; }
inline void store(double* p, double v) { *p = v; }

inline float load(const BFloat16* p) { return bits_to_float(uint32_t(p->bits) << 16); }

inline void store(BFloat16* p, float v) {
  uint32_t u = float_to_bits(v);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  // Rounding could carry a NaN's mantissa into the exponent; torch writes every NaN as 0x7fc0.
  bool is_nan = (u & 0x7fffffffu) > 0x7f800000u;
  p->bits = uint16_t(is_nan ? 0x7fc0u : rounded);
}

inline float load(const Half* p) {
  uint32_t h = p->bits;
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t body = (h & 0x7fffu) << 13;  // exponent and mantissa in float position
  uint32_t exponent = body & 0x0f800000u;
  uint32_t normal = body + ((127u - 15u) << 23);
  uint32_t inf_nan = body + ((255u - 31u) << 23);
  // Subnormal halves: place the mantissa under exponent 2^-14 and subtract the implicit one, exactly.
  float subnormal = bits_to_float(body + (113u << 23)) - bits_to_float(113u << 23);
  uint32_t out = exponent == 0x0f800000u ? inf_nan : exponent == 0 ? float_to_bits(subnormal) : normal;
  return bits_to_float(out | sign);
}

inline void store(Half* p, float v) {
  uint32_t u = float_to_bits(v);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  // Below 2^-14 the result is subnormal: adding 0.5 lets the float adder do the rounding.
  float magic = bits_to_float(126u << 23);
  uint32_t subnormal = float_to_bits(bits_to_float(a) + magic) - float_to_bits(magic);
  uint32_t normal = (a + ((15u - 127u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
  uint32_t overflow = a > 0x7f800000u ? 0x7e00u : 0x7c00u;  // NaN stays NaN, the rest is inf
  uint32_t out = a >= ((127u + 16u) << 23) ? overflow : a < (113u << 23) ? subnormal : normal;
  p->bits = uint16_t(out | sign);
}

}  // namespace PYFUSED_ISA
}  // namespace pyfused
