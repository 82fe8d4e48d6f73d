// The build for CPUs with AVX2, FMA and F16C. -ffp-contract=off keeps the compiler from fusing on
// its own: the optimizers fuse exactly where torch's CPU kernels do (mul_add in csrc/optimizers.h),
// so this build and the AVX-512 one round identically.
#include "isa_std.h"
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c")
#define PYFUSED_ISA avx2
#include "kernels_impl.h"
#endif
