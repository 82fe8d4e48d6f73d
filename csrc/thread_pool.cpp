#include "thread_pool.h"

#include <unistd.h>

#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace pyfused {
namespace {

class Pool {
 public:
  void run(int n, const std::function<void(int)>& fn) {
    std::lock_guard<std::mutex> one_job_at_a_time(run_mutex_);
    grow(n - 1);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      job_ = &fn;
      active_ = n - 1;
      pending_ = n - 1;
      ++generation_;
    }
    wake_.notify_all();
    fn(0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [&] { return pending_ == 0; });
    job_ = nullptr;
  }

 private:
  void grow(int workers) {
    while (int(threads_.size()) < workers) {
      int index = int(threads_.size()) + 1;
      threads_.emplace_back([this, index] { work(index); });
      threads_.back().detach();  // lives as long as the process; joining at exit races interpreter teardown
    }
  }

  void work(int index) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int)>* job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (index > active_) continue;
        job = job_;
      }
      (*job)(index);
      std::lock_guard<std::mutex> lock(mutex_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex run_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_;
  std::condition_variable done_;
  std::vector<std::thread> threads_;
  const std::function<void(int)>* job_ = nullptr;
  uint64_t generation_ = 0;
  int active_ = 0;
  int pending_ = 0;
};

Pool* pool_for_this_process() {
  // A forked child (a DataLoader worker, say) inherits the pool but none of its threads.
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  static pid_t owner = 0;
  static Pool* pool = nullptr;
  if (pool == nullptr || owner != getpid()) {
    pool = new Pool();  // the parent's pool, if any, is unusable here and deliberately leaked
    owner = getpid();
  }
  return pool;
}

}  // namespace

void parallel_run(int n, const std::function<void(int)>& fn) {
  if (n <= 1) {
    fn(0);
    return;
  }
  pool_for_this_process()->run(n, fn);
}

}  // namespace pyfused
