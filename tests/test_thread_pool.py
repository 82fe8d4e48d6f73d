"""The C++ thread pool (csrc/thread_pool.cpp) under load: many small jobs back to back, jobs from
two Python threads at once, and a forked child. Each job is a dropout over a few chunks (so, with
up to 8 threads, 1 to 5 pool workers take part and the rest sit it out), whose result is exact
and does not depend on the thread count: every comparison is bitwise against one thread's.
"""

import os
import signal
import threading
import time

import pytest
import torch

import pyfused
from pyfused.nn import functional as F

SIZES = (16384 + 5, 2 * 16384 + 7, 3 * 16384, 5 * 16384 + 77)  # 2, 3, 4 and 6 dropout chunks of 16,320


@pytest.fixture(autouse=True)
def _cpp_backend():
    with pyfused.use_backend("cpp"):
        yield


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


def drop(x, seed):
    return F.dropout(x, 0.5, generator=torch.Generator().manual_seed(seed))


def one_thread_results(inputs, seeds, threads):
    threads(1)
    return [[drop(x, s) for s in seeds] for x in inputs]


@pytest.mark.parametrize("n", [2, 3, 8])
def test_many_small_jobs_back_to_back(n, threads):
    inputs = [torch.randn(size) for size in SIZES]
    seeds = range(5)
    expected = one_thread_results(inputs, seeds, threads)
    threads(n)
    for round in range(100):  # 2000 jobs, the active thread count changing from one to the next
        for i, x in enumerate(inputs):
            for s in seeds:
                assert torch.equal(drop(x, s), expected[i][s]), (round, i, s)


def test_jobs_from_two_python_threads_at_once(threads):
    inputs = [torch.randn(size) for size in SIZES]
    seeds = range(3)
    expected = one_thread_results(inputs, seeds, threads)
    threads(3)
    failures, start = [], threading.Barrier(2)

    def worker(offset):
        start.wait()
        for round in range(150):  # the C++ calls release the GIL, so the two threads overlap
            for i in range(len(inputs)):
                i = (i + offset) % len(inputs)
                for s in seeds:
                    if not torch.equal(drop(inputs[i], s), expected[i][s]):
                        failures.append((offset, round, i, s))

    pair = [threading.Thread(target=worker, args=(offset,)) for offset in (0, 1)]
    for t in pair:
        t.start()
    for t in pair:
        t.join()
    assert failures == []


def test_a_forked_child_gets_a_working_pool(threads):
    x = torch.randn(SIZES[-1])
    expected = one_thread_results([x], [0], threads)[0][0]
    threads(2)
    assert torch.equal(drop(x, 0), expected)  # the parent's pool now has a worker
    want = expected.numpy().tobytes()
    pid = os.fork()
    if pid == 0:  # the child has none of the parent's threads: a stale pool would hang here
        # Compared in numpy: torch's own parallel ops hang in a child forked after they ran (libgomp).
        ok = torch.get_num_threads() == 2 and all(drop(x, 0).numpy().tobytes() == want for _ in range(50))
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert done[0] == pid and os.waitstatus_to_exitcode(done[1]) == 0, "the child hung or failed"
