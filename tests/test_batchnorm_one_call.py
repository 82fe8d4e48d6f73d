"""The one-call C++ forward and backward (csrc/batchnorm.h's forward and backward, which take a
channel through all its steps while its data is in cache where they can) against the separate
steps SyncBatchNorm and the Triton backend use: equal bit for bit, on every thread count, in
both schedules (the per-channel one needs a planar layout, channels >= 4 x threads and a
channel's data within 1 MiB; the shapes below fall on both sides of each condition)."""

import pytest
import torch

from pyfused import _cpp
from pyfused.nn.batchnorm import _dense, _split_backward, _split_forward

SHAPES = [
    ((8, 16, 7, 7), False),    # planar, per channel on 1 and 2 threads
    ((8, 16, 7, 7), True),     # channels_last: rows walk
    ((4, 5, 40), False),       # planar; 5 channels: per channel on 1 thread only
    ((3, 16, 5000), False),    # two partitions per plane
    ((2, 8, 300, 300), False), # a channel's data over 1 MiB: the separate passes
    ((2, 3, 1, 1), False),     # rows walk, one element per plane
    ((64, 24), False),         # BatchNorm1d
]
DTYPES = [(torch.float32, torch.float32), (torch.float64, torch.float64), (torch.bfloat16, torch.float32),
          (torch.float16, torch.float16)]


def _inputs(shape, channels_last, dtype, param_dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        dy = dy.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    params = [torch.randn(c, generator=g).to(param_dtype), torch.randn(c, generator=g).to(param_dtype),
              torch.randn(c, generator=g).to(param_dtype), torch.rand(c, generator=g).to(param_dtype) + 0.5]
    return x, dy, params


@pytest.mark.parametrize("shape,channels_last", SHAPES, ids=[str(s) + ("-cl" if cl else "") for s, cl in SHAPES])
@pytest.mark.parametrize("dtype,param_dtype", DTYPES, ids=[str(d).split(".")[1] for d, _ in DTYPES])
def test_one_call_equals_separate_steps(shape, channels_last, dtype, param_dtype, monkeypatch):
    monkeypatch.setattr(_cpp, "BN_GRAIN", 1)  # small shapes on every thread count, not only one
    x, dy, (w, b, rm, rv) = _inputs(shape, channels_last, dtype, param_dtype)
    xd, view = _dense(x)
    code = _cpp.DTYPE_CODES[param_dtype]
    threads = torch.get_num_threads()
    try:
        for relu in (False, True):
            for training in (True, False):
                stats = (rm.clone(), rv.clone())
                y_ref, saved_ref, count = _split_forward(_cpp, xd, view, code, w, b, stats, training, 0.1, 1e-5,
                                                         relu, None)
                grads_ref = _split_backward(_cpp, dy, xd, view, saved_ref, code, count, w, b, (True, True, True),
                                            training, relu, None)
                for n in (1, 2, 3):
                    torch.set_num_threads(n)
                    mine = (rm.clone(), rv.clone())
                    y, saved = _cpp.bn_forward(xd, view, code, w, b, *mine, training, 0.1, 1e-5, relu)
                    grads = _cpp.bn_backward(dy, xd, view, saved, code, w, b, True, True, True, training, relu)
                    assert torch.equal(y, y_ref) and y.stride() == y_ref.stride(), (relu, training, n)
                    assert torch.equal(saved, saved_ref), (relu, training, n)
                    assert all(torch.equal(a, r) for a, r in zip(mine, stats)), (relu, training, n)
                    assert all(torch.equal(a, r) for a, r in zip(grads, grads_ref)), (relu, training, n)
                    # grads not asked for are not made, and skipping them changes nothing else
                    only_x = _cpp.bn_backward(dy, xd, view, saved, code, w, b, True, False, False, training, relu)
                    assert only_x[1] is None and only_x[2] is None and torch.equal(only_x[0], grads_ref[0])
                    only_w = _cpp.bn_backward(dy, xd, view, saved, code, w, b, False, True, False, training, relu)
                    assert only_w[0] is None and torch.equal(only_w[1], grads_ref[1])
    finally:
        torch.set_num_threads(threads)


def test_one_call_empty_batch_leaves_running_stats():
    x = torch.randn(0, 4, 3, 3)
    w, b, rm, rv = torch.ones(4), torch.zeros(4), torch.full((4,), 0.5), torch.full((4,), 2.0)
    y, saved = _cpp.bn_forward(x, (0, 4, 9), 0, w, b, rm, rv, True, 0.1, 1e-5, False)
    assert y.shape == x.shape and torch.equal(saved, torch.zeros(4, 4, dtype=torch.float64))
    assert torch.equal(rm, torch.full((4,), 0.5)) and torch.equal(rv, torch.full((4,), 2.0))
    dx, dw, db = _cpp.bn_backward(torch.randn(0, 4, 3, 3), x, (0, 4, 9), saved, 0, w, b, True, True, True, True, False)
    assert dx.shape == x.shape and torch.equal(dw, torch.zeros(4)) and torch.equal(db, torch.zeros(4))
