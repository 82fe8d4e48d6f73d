// The build for any x86-64 CPU (SSE2), and for every other architecture.
#define PYFUSED_ISA baseline
#include "kernels_impl.h"
