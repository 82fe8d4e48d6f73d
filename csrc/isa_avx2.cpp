// The build for CPUs with AVX2, FMA and F16C. -ffp-contract=off keeps FMA from changing results,
// so every build rounds identically.
#include "isa_std.h"
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#define PYFUSED_ISA avx2
#include "kernels_impl.h"
#endif
