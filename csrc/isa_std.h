// The standard headers the kernels use, included before an isa_*.cpp sets its target, so that
// only pyfused's own code is compiled for that instruction set.
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <utility>
#include <vector>
