// The build for CPUs with AVX-512 (F, BW, VL), using full 512-bit vectors.
#include "isa_std.h"
#if defined(__x86_64__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c,prefer-vector-width=512")
#define PYFUSED_ISA avx512
#include "kernels_impl.h"
#endif
