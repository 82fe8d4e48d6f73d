"""capturable=True: step counters on the device, lr read on the device, GradScaler's verdict read
on the device; the result equals the host-driven path's. (Capturing the step in a CUDA graph and
replaying it needs a GPU: test_graph_replay runs there.)"""

import pytest
import torch

import pyfused
from pyfused import _cpp
from test_cpp_vs_triton import _fma_rounds_once
from triton_suite import DEVICE

CASES = [
    ("Adam", dict(lr=1e-2, weight_decay=0.0625, amsgrad=True)),
    ("AdamW", dict(lr=1e-2, maximize=True)),
    ("RMSprop", dict(lr=1e-2, momentum=0.5, centered=True)),
    ("Adadelta", dict(lr=0.5, weight_decay=0.01, maximize=True)),
]
DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def train(name, kwargs, dtype, capturable, backend, lr_tensor, steps=6, inf_steps=()):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen).to(dtype).to(DEVICE).requires_grad_() for n in (0, 1, 7, 4097)]
    # A float64 tensor holds the float lr exactly, so both paths see the same rate.
    kwargs = dict(kwargs, lr=torch.tensor(kwargs["lr"], dtype=torch.float64, device=DEVICE) if lr_tensor else kwargs["lr"])
    opt = getattr(pyfused.optim, name)(params, capturable=capturable, **kwargs)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=4.0, growth_interval=1000)
    for step in range(steps):
        for p in params:
            p.grad = scaler.scale(torch.randn(p.shape, generator=gen)).to(dtype).to(DEVICE)
        if step in inf_steps:
            params[-1].grad[0] = float("inf")
        with pyfused.use_backend(backend):
            scaler.step(opt)
        scaler.update()
        schedule.step()
    return params, opt


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,kwargs", CASES, ids=[c[0] for c in CASES])
def test_capturable_matches_the_host_path(name, kwargs, dtype):
    ours, opt = train(name, kwargs, dtype, True, "triton", lr_tensor=True, inf_steps=(2, 3))
    # The host path on the C++ backend where it is Triton's bitwise twin (an FMA build, and an
    # interpreter whose tl.fma rounds once); else on Triton itself.
    on_cpp = DEVICE.type == "cpu" and _cpp.isa() != "baseline" and _fma_rounds_once()
    ref, ref_opt = train(name, kwargs, dtype, False, "cpp" if on_cpp else "triton",
                         lr_tensor=False, inf_steps=(2, 3))
    for a, b, pa, pb in zip(ours, ref, ours, ref):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=0, atol=0)
        state, ref_state = opt.state[pa], ref_opt.state[pb]
        assert state["step"].device == pa.device  # the counter lives with its param
        assert state["step"].item() == ref_state["step"].item() == 4  # two of six steps skipped
        for key in ref_state:
            torch.testing.assert_close(state[key].cpu(), ref_state[key].cpu(), rtol=0, atol=0)


def test_refused_for_cpu_params_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="capturable=True only for CUDA params"):
        pyfused.optim.Adam([torch.zeros(3, requires_grad=True)], capturable=True)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
def test_graph_replay():
    params = [torch.randn(n, device=DEVICE, requires_grad=True) for n in (7, 4097)]
    ref = [p.detach().clone().requires_grad_() for p in params]
    opt = pyfused.optim.AdamW(params, lr=torch.tensor(1e-2, device=DEVICE), capturable=True)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    grads = [torch.randn_like(p) for p in params]
    for p, r, g in zip(params, ref, grads):
        p.grad, r.grad = g, g.clone()
    opt.step()  # warm-up: compiles, builds the plan, uploads the tables
    ref_opt.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for _ in range(5):
        graph.replay()
        ref_opt.step()
    for p, r in zip(params, ref):
        torch.testing.assert_close(p, r, rtol=1.3e-6, atol=1e-5)
