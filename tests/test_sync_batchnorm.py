"""pyfused.nn.SyncBatchNorm on CPU with gloo: 2 processes, each holding half the batch (uneven
halves), against single-process BatchNorm over the whole batch: output, dx, parameter grads
(summed over the ranks, as DDP would) and running stats over several steps, then eval.

Tolerance 1e-5 (fp32, relative to each tensor's largest value, at least 1): the statistics merge
the two ranks' (count, mean, M2) in double instead of all partitions at once, which moves them by
~1e-16 relative; what is left is the fp32 rounding of the elementwise passes, as in
tests/test_batchnorm.py.
"""

import datetime
import os
import socket
import time
import traceback

import pytest
import torch

dist = pytest.importorskip("torch.distributed", reason="torch.distributed is not available")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed has no gloo backend in this build of torch", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

from pyfused import nn as pnn  # noqa: E402

WORLD_SIZE = 2
TEST_TIMEOUT_S = 60
TOL = 1e-5
SHAPE = (7, 5, 6, 6)  # rank 0 takes 4 samples, rank 1 takes 3
CUT = 4
STEPS = 3


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _worker(rank, port, out_dir, cl, relu):
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=20))
        module = pnn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(make_module(relu)))[0]
        assert isinstance(module, pnn.SyncBatchNorm)
        piece = slice(0, CUT) if rank == 0 else slice(CUT, None)
        torch.save(steps(module, batches(cl, relu), piece), os.path.join(out_dir, f"{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def close(actual, expected, what):
    scale = max(expected.double().abs().max().item(), 1.0)
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= TOL * scale, f"{what}: {err:.3g} > {TOL} * {scale:.3g}"


@pytest.mark.parametrize("cl,relu", [(False, False), (True, True)], ids=["contiguous-bn", "channels-last-bn-relu"])
def test_two_gloo_ranks_equal_one_process(tmp_path, cl, relu):
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path), cl, relu)) for r in range(WORLD_SIZE)]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + TEST_TIMEOUT_S
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join()
    errors = [(tmp_path / f"{r}.err").read_text() for r in range(WORLD_SIZE) if (tmp_path / f"{r}.err").exists()]
    assert not errors, "\n".join(errors)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD_SIZE)]

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
