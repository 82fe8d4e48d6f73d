"""Step statistics (track_stats=True) on the Triton backend: against norms of snapshots taken by
torch, and against the C++ backend's.

Tolerances (see tests/test_optim_stats.py): each backend sums squares in opmath lanes, at most
1,024 terms a lane (C++: kChunk / 16; Triton: CHUNK / BLOCK, 16 compiled, 4 interpreted), then in
float64; a norm is then within 1,024 u / 2 of the float64 reference and a ratio within 1,024 u.
So rtol 1e-4 where opmath is float (u = 2^-24) and 1e-12 for fp64, against the snapshots and, the
params being the same bits, between the backends.
"""

import pytest
import torch

import pyfused
from pyfused import _cpp
from pyfused.optim.stats import FIELDS
from test_cpp_vs_triton import _fma_rounds_once
from triton_suite import DEVICE

# An empty param's ratio is 0 / 0 = NaN, as in torch; the interpreter's numpy says so aloud.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")

CONFIGS = {
    "SGD": dict(lr=1e-3, momentum=0.9, weight_decay=0.01),
    "Adagrad": dict(lr=1e-3, weight_decay=0.01),
    "RMSprop": dict(lr=1e-3, momentum=0.9, centered=True),
    "Adam": dict(lr=1e-3, weight_decay=0.1, amsgrad=True),
    "AdamW": dict(lr=1e-3, weight_decay=0.1),
    "Adadelta": dict(lr=1e-3, weight_decay=0.01),
}
DTYPES = [(torch.float32, 1e-4), (torch.float64, 1e-12), (torch.bfloat16, 1e-4), (torch.float16, 1e-4)]
SIZES = (0, 1, 7, 16385, 300)  # 16385: a chunk edge and a one-element tail chunk


def norms(old, grad, new):
    norm = torch.linalg.vector_norm
    update, param = norm(new.double() - old.double()), norm(old.double())
    return torch.stack([norm(grad.double()), update, param, update / param])


def run(name, dtype, backend, device, steps=2, **options):
    """Each step's stats table (params x FIELDS, on the host) and the snapshots' norms."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen).to(dtype).to(device).requires_grad_() for n in SIZES]
    lr = CONFIGS[name]["lr"]
    groups = [dict(params=params[:2]), dict(params=params[2:], lr=lr * 100)]
    opt = getattr(pyfused.optim, name)(groups, **CONFIGS[name], track_stats=True, **options)
    got, want = [], []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype).to(device)
        old = [p.detach().clone() for p in params]
        grads = [p.grad.clone() for p in params]
        with pyfused.use_backend(backend):
            opt.step()
        got.append(torch.stack([torch.stack(opt.stats[p]) for p in params]).cpu())
        want.append(torch.stack([norms(o, g, p.detach()) for o, g, p in zip(old, grads, params)]).cpu())
    return got, want


@pytest.mark.parametrize("dtype, rtol", DTYPES, ids=[str(d) for d, _ in DTYPES])
@pytest.mark.parametrize("name", CONFIGS)
def test_matches_snapshots_and_cpp(name, dtype, rtol):
    got, want = run(name, dtype, "triton", DEVICE)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=rtol, atol=0, equal_nan=True)
    assert got[-1][3, FIELDS.index("update_ratio")] > 1e-6  # a real update
    if not _fma_rounds_once() or _cpp.isa() == "baseline":
        pytest.skip("the C++ and Triton params are bitwise twins only with an FMA build and an interpreter whose "
                    "tl.fma rounds once (tests/triton/test_cpp_vs_triton.py); compared with the snapshots only")
    cpp, _ = run(name, dtype, "cpp", torch.device("cpu"))
    for a, b in zip(got, cpp):
        torch.testing.assert_close(a, b, rtol=rtol, atol=0, equal_nan=True)


def test_capturable_skipped_step_leaves_nan():
    """capturable=True: GradScaler's verdict is read on the device; a skipped step writes no stats."""
    params = [torch.randn(n, generator=torch.Generator().manual_seed(0)).to(DEVICE).requires_grad_() for n in SIZES]
    opt = pyfused.optim.Adam(params, lr=torch.tensor(1e-3, dtype=torch.float64, device=DEVICE), capturable=True,
                             track_stats=True)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=4.0)
    for step in range(2):
        for p in params:
            p.grad = scaler.scale(torch.ones_like(p))
        if step == 1:
            params[3].grad[0] = float("inf")
        old = [p.detach().clone() for p in params]
        scaler.step(opt)
        scaler.update()
        table = torch.stack([torch.stack(opt.stats[p]) for p in params]).cpu()
        if step == 0:
            want = torch.stack([norms(o, torch.ones_like(o), p.detach()) for o, p in zip(old, params)]).cpu()
            torch.testing.assert_close(table, want, rtol=1e-4, atol=0, equal_nan=True)
        else:
            assert table.isnan().all()
