"""pyfused.nn.SyncBatchNorm on CPU with gloo: 2 processes, each holding half the batch (uneven
halves), against single-process BatchNorm over the whole batch: output, dx, parameter grads
(summed over the ranks, as DDP would) and running stats over several steps, then eval.

Tolerance 1e-5 (fp32, relative to each tensor's largest value, at least 1): the statistics merge
the two ranks' (count, mean, M2) in double instead of all partitions at once, which moves them by
~1e-16 relative; what is left is the fp32 rounding of the elementwise passes, as in
tests/test_batchnorm.py.
"""

import pytest
import torch

dist = pytest.importorskip("torch.distributed", reason="torch.distributed is not available")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed has no gloo backend in this build of torch", allow_module_level=True)

from _gloo import result_of, run_ranks  # noqa: E402
from pyfused import nn as pnn  # noqa: E402

WORLD_SIZE = 2
TEST_TIMEOUT_S = 60
TOL = 1e-5
SHAPE = (7, 5, 6, 6)  # rank 0 takes 4 samples, rank 1 takes 3
CUT = 4
STEPS = 3


def batches(cl, relu):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(STEPS + 1):
        x = torch.randn(SHAPE, generator=gen) * 2 + 1
        g = torch.randn(SHAPE, generator=gen)
        if cl:
            x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
        out.append((x, g))
    return out


def make_module(relu):
    torch.manual_seed(0)
    base = (pnn.BatchNormReLU2d if relu else pnn.BatchNorm2d)(SHAPE[1], momentum=None if relu else 0.1)
    with torch.no_grad():
        base.weight.uniform_(0.5, 1.5)
        base.bias.uniform_(-1, 1)
    return base


def steps(module, data, piece):
    """Runs STEPS training steps and one eval step on the given piece of each batch."""
    results = []
    for i, (x, g) in enumerate(data):
        module.train(i < STEPS)
        for p in module.parameters():
            p.grad = None
        xs = x[piece].clone().requires_grad_()
        y = module(xs)
        y.backward(g[piece])
        results.append({"y": y.detach(), "dx": xs.grad, "dw": module.weight.grad.clone(),
                        "db": module.bias.grad.clone(), "rm": module.running_mean.clone(),
                        "rv": module.running_var.clone(), "n": module.num_batches_tracked.clone()})
    return results


def _ranks_part(rank, cl, relu):
    module = pnn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(make_module(relu)))[0]
    assert isinstance(module, pnn.SyncBatchNorm)
    piece = slice(0, CUT) if rank == 0 else slice(CUT, None)
    return steps(module, batches(cl, relu), piece)


def _contiguous_bn(rank, out_dir):
    return _ranks_part(rank, cl=False, relu=False)


def _channels_last_bn_relu(rank, out_dir):
    return _ranks_part(rank, cl=True, relu=True)


CASES = {"contiguous-bn": ("_contiguous_bn", False, False),
         "channels-last-bn-relu": ("_channels_last_bn_relu", True, True)}


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    """Both cases on one pair of gloo processes."""
    return run_ranks("test_sync_batchnorm", [body for body, _, _ in CASES.values()],
                     tmp_path_factory.mktemp("sync_batchnorm"), world_size=WORLD_SIZE, timeout_s=TEST_TIMEOUT_S)


def close(actual, expected, what):
    scale = max(expected.double().abs().max().item(), 1.0)
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= TOL * scale, f"{what}: {err:.3g} > {TOL} * {scale:.3g}"


@pytest.mark.parametrize("case", CASES)
def test_two_gloo_ranks_equal_one_process(gloo_results, case):
    body, cl, relu = CASES[case]
    ranks = result_of(gloo_results, body)
    reference = (torch.nn.BatchNorm2d(SHAPE[1], momentum=None if relu else 0.1))
    reference.load_state_dict(make_module(relu).state_dict())
    data = batches(cl, relu)
    for i, (x, g) in enumerate(data):
        reference.train(i < STEPS)
        for p in reference.parameters():
            p.grad = None
        xs = x.clone().requires_grad_()
        y = reference(xs)
        y = torch.relu(y) if relu else y
        y.backward(g)
        r0, r1 = ranks[0][i], ranks[1][i]
        close(torch.cat([r0["y"], r1["y"]]), y, f"step {i} output")
        close(torch.cat([r0["dx"], r1["dx"]]), xs.grad, f"step {i} dx")
        close(r0["dw"] + r1["dw"], reference.weight.grad, f"step {i} dweight")
        close(r0["db"] + r1["db"], reference.bias.grad, f"step {i} dbias")
        for r in (r0, r1):
            close(r["rm"], reference.running_mean, f"step {i} running_mean")
            close(r["rv"], reference.running_var, f"step {i} running_var")
            assert r["n"].item() == reference.num_batches_tracked.item()


def test_without_process_group_it_is_batch_norm():
    assert not dist.is_initialized()
    sync, plain = pnn.SyncBatchNorm(4), pnn.BatchNorm2d(4)
    x = torch.randn(3, 4, 5, 5)
    assert torch.equal(sync(x), plain(x))
    assert torch.equal(sync.running_var, plain.running_var)
