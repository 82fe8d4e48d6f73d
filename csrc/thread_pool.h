// A small persistent pool: the C++ module does not link libtorch, so it cannot borrow torch's.
#pragma once

#include <functional>

namespace pyfused {

// Runs fn(worker) for worker in [0, n) and returns when every call has returned. The caller runs
// worker 0 itself. Calls from several Python threads are serialized.
void parallel_run(int n, const std::function<void(int)>& fn);

}  // namespace pyfused
