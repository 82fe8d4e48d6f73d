"""pyfused.nn.BatchNorm*/BatchNormReLU* (C++ backend) against torch.nn.BatchNorm* (and torch.relu)
run in float64 on the same (rounded) inputs and parameters: a reference rounded once.

The case table, the reference and the tolerances per dtype (each with its reason) are
pyfused/check/batchnorm_cases.py's, shared with pyfused-check.
"""

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

import pyfused
from pyfused import _cpp
from pyfused import nn as pnn
from pyfused.check.batchnorm_cases import (DTYPE_PAIRS, LAYOUT_SHAPES, OPTIONS, OPTIONS_SHAPE, SHAPES, batch, close,
                                           make, options_id, run_and_compare)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
def test_fp32_train_then_eval(shape, relu):
    torch.manual_seed(0)
    cl = False
    ref, ours = make(shape, torch.float32, torch.float32, relu, cl)
    run_and_compare(ref, ours, shape, torch.float32, relu, cl)
    assert ours.num_batches_tracked.item() == 3
    ref.eval(), ours.eval()
    run_and_compare(ref, ours, shape, torch.float32, relu, cl, steps=1)


@pytest.mark.parametrize("shape", LAYOUT_SHAPES, ids=str)
@pytest.mark.parametrize("dtype,param_dtype", DTYPE_PAIRS.values(), ids=DTYPE_PAIRS.keys())
@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
def test_dtypes_and_layouts(shape, dtype, param_dtype, cl, relu):
    ref, ours = make(shape, dtype, param_dtype, relu, cl)
    run_and_compare(ref, ours, shape, dtype, relu, cl, steps=2)
    ref.eval(), ours.eval()
    run_and_compare(ref, ours, shape, dtype, relu, cl, steps=1)


@pytest.mark.parametrize("options", OPTIONS, ids=options_id)
def test_options(options):
    shape = OPTIONS_SHAPE
    ref, ours = make(shape, torch.float32, torch.float32, False, False, **options)
    run_and_compare(ref, ours, shape, torch.float32, False, False, steps=3)
    ref.eval(), ours.eval()
    run_and_compare(ref, ours, shape, torch.float32, False, False, steps=2)


def test_grad_in_eval_mode_and_odd_strides():
    ref, ours = make((4, 6, 5, 5), torch.float32, torch.float32, False, False)
    ref.eval(), ours.eval()
    base = torch.randn(5, 4, 6, 10)
    x = base.permute(1, 2, 0, 3)[..., ::2]  # neither contiguous nor channels_last
    xr, xo = x.double().requires_grad_(), x.detach().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    grad = torch.randn(4, 6, 5, 5).transpose(2, 3).contiguous().transpose(2, 3)
    yr.backward(grad.double()), yo.backward(grad)
    close(yo, yr, 1e-5, "output")
    close(xo.grad, xr.grad, 1e-5, "dx")
    close(ours.weight.grad, ref.weight.grad, 1e-5, "dweight")
    close(ours.bias.grad, ref.bias.grad, 1e-5, "dbias")


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cl", [False, True], ids=["contiguous", "channels-last"])
def test_gradcheck_fp64(relu, training, cl):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64, generator=gen)
    if cl:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.rand(4, dtype=torch.float64, generator=gen).add_(0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, generator=gen).requires_grad_()
    rm, rv = torch.randn(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64) + 0.5

    def fn(x, w, b):
        return pyfused.nn.batchnorm.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, relu=relu)

    assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("relu", [False, True], ids=["bn", "bn-relu"])
def test_create_graph_backward_works_and_double_backward_is_refused(relu):
    module = pnn.BatchNormReLU1d(8) if relu else pnn.BatchNorm1d(8)
    x = torch.randn(5, 8, requires_grad=True)
    (plain,) = torch.autograd.grad(module(x).pow(2).sum(), x)
    (dx,) = torch.autograd.grad(module(x).pow(2).sum(), x, create_graph=True)
    assert dx.requires_grad and torch.equal(dx.detach(), plain)
    with pytest.raises(RuntimeError, match="trying to differentiate twice a function that was marked with "
                                           "@once_differentiable"):
        dx.sum().backward()


def test_matches_torch_functional_and_zero_size():
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    ours = pnn.BatchNorm2d(3)
    y = ours(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert torch.equal(ours.weight.grad, torch.zeros(3)) and torch.equal(ours.bias.grad, torch.zeros(3))
    assert torch.equal(ours.running_mean, torch.zeros(3)) and torch.equal(ours.running_var, torch.ones(3))
    assert ours.num_batches_tracked.item() == 1


def test_saves_only_the_input_and_per_channel_values():
    for module in (pnn.BatchNorm2d(5), pnn.BatchNormReLU2d(5)):
        x = torch.randn(4, 5, 6, 6, requires_grad=True)
        saved = []
        with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            module(x)
        big = [t for t in saved if t.numel() > 5 * 4]
        assert len(big) == 1 and big[0].data_ptr() == x.data_ptr(), [tuple(t.shape) for t in saved]


def test_state_dict_round_trip_and_repr():
    ref = torch.nn.BatchNorm2d(7, momentum=0.2)
    ref(torch.randn(4, 7, 3, 3))
    ours = pnn.BatchNorm2d(7, momentum=0.2)
    ours.load_state_dict(ref.state_dict())
    back = torch.nn.BatchNorm2d(7, momentum=0.2)
    back.load_state_dict(ours.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    assert repr(ours) == repr(ref)
    assert isinstance(ours, torch.nn.BatchNorm2d)


@pytest.mark.parametrize("shape,cl", [((7, 9, 65, 67), False), ((7, 9, 65, 67), True), ((300, 70), False)],
                         ids=["planar", "rows-channels-last", "rows-1d"])
def test_statistics_and_grads_do_not_depend_on_thread_count(shape, cl, monkeypatch):
    # The planar walk, and the rows walk with a narrower last tile of columns (70 = 64 + 6). These
    # shapes are below the grain that would keep them on one thread: every thread count runs.
    monkeypatch.setattr(_cpp, "BN_GRAIN", 1)
    x = batch(shape, torch.float32, cl, 3).requires_grad_()
    dy = batch(shape, torch.float32, cl, 4)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            m = pnn.BatchNorm2d(shape[1]) if len(shape) == 4 else pnn.BatchNorm1d(shape[1])
            y = m(x)
            grads = torch.autograd.grad(y, [x, m.weight, m.bias], dy)
            outs.append((y, m.running_mean.clone(), m.running_var.clone(), *grads))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("shape,cl", [((16, 3, 64, 64), False), ((16, 3, 64, 64), True), ((4099, 70), False)],
                         ids=["planar", "rows-channels-last", "rows-1d"])
def test_large_mean_is_stable(shape, cl):
    # The rows walk folds blocks of rows in float: its shifts keep the variance exact here too.
    x = torch.randn(shape, dtype=torch.float64) + 1e4  # |mean| / std = 1e4
    ours = pnn.BatchNorm2d(3) if len(shape) == 4 else pnn.BatchNorm1d(shape[1])
    ours(x.float().to(memory_format=torch.channels_last) if cl else x.float())
    dims = [d for d in range(len(shape)) if d != 1]
    ref_var = x.float().double().var(dim=dims)
    close(ours.running_var, 0.9 + 0.1 * ref_var, 1e-6, "running_var")


BAD = [
    (pnn.BatchNorm2d(4), torch.randn(2, 3, 5, 5), RuntimeError, "running_mean should contain 3 elements not 4"),
    (pnn.BatchNorm2d(4), torch.randn(1, 4, 1, 1), ValueError,
     "Expected more than 1 value per channel when training, got input size torch.Size([1, 4, 1, 1])"),
    (pnn.BatchNorm2d(4), torch.randn(2, 4, 5), ValueError, "expected 4D input (got 3D input)"),
    (pnn.BatchNorm1d(4), torch.randn(2, 4, 5, 5), ValueError, "expected 2D or 3D input (got 4D input)"),
    (pnn.BatchNorm3d(4), torch.randn(2, 4, 5, 5), ValueError, "expected 5D input (got 4D input)"),
    (pnn.BatchNorm2d(3, affine=True, track_running_stats=False), torch.randn(2, 4, 5, 5), RuntimeError,
     "weight should contain 4 elements not 3"),
    (pnn.BatchNorm2d(3).double(), torch.randn(2, 3, 5, 5), RuntimeError,
     "mixed dtype (CPU): expect parameter to have scalar type of Float"),
    (pnn.BatchNorm2d(3), torch.randn(2, 3, 5, 5, dtype=torch.float64), RuntimeError,
     "mixed dtype (CPU): all inputs must share same datatype."),
]


@pytest.mark.parametrize("module,x,error,message", BAD, ids=range(len(BAD)))
def test_bad_input_gets_torchs_error_and_changes_nothing(module, x, error, message):
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(error) as raised:
        module(x)
    assert str(raised.value) == message
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_forced_torch_backend_is_torch():
    ref, ours = make((4, 3, 5, 5), torch.float32, torch.float32, True, False)
    ref.float()
    x = torch.randn(4, 3, 5, 5)
    with pyfused.use_backend("torch"):
        y = ours(x)
    assert torch.equal(y, torch.relu(ref(x)))
