"""The C++ build for CPUs with FMA (avx2, avx512) and the Triton kernels agree bit for bit: same
inputs, params and every state tensor.

Both compute in opmath with the same scalars, the same operation order, IEEE division and square
root, and one fused multiply-add exactly where torch's CPU kernels use one (add with alpha,
addcmul, lerp), then round once; so equality is exact, for every dtype (the 16-bit ones round the
same opmath value to nearest even on both sides). The baseline C++ build rounds those a * b + c
twice, like torch without FMA, so on a CPU without FMA there is no bitwise twin to compare with.
"""

import functools
import itertools

import pytest
import torch

import pyfused
from pyfused import _cpp
from triton_suite import DEVICE

@functools.cache
def _fma_rounds_once():
    """Whether tl.fma rounds once here: compiled, always; older interpreters (triton 3.6) compute
    it as x * y + z in the operands' dtype, rounding twice."""
    import triton
    import triton.language as tl

    @triton.jit
    def fma_kernel(x):
        tl.store(x, tl.fma(tl.load(x), tl.load(x + 1), tl.load(x + 2)))

    a = 1 + 2.0**-12  # a * a = 1 + 2**-11 + 2**-24: the product alone rounds the 2**-24 away
    x = torch.tensor([a, a, -1.0], dtype=torch.float32, device=DEVICE)
    fma_kernel[(1,)](x)
    return x[0].item() == 2.0**-11 + 2.0**-24


CONFIGS = {
    "SGD": [dict(lr=0.1), dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01),
            dict(lr=0.1, momentum=0.9, nesterov=True, maximize=True)],
    "Adagrad": [dict(lr=0.1, lr_decay=0.01, weight_decay=0.1, initial_accumulator_value=0.1)],
    "RMSprop": [dict(lr=0.01), dict(lr=0.01, momentum=0.9, centered=True, weight_decay=0.1),
                dict(lr=0.01, centered=True, maximize=True), dict(lr=0.01, momentum=0.5)],
    "Adam": [dict(lr=1e-2), dict(lr=1e-2, amsgrad=True, weight_decay=0.1, maximize=True),
             dict(lr=1e-2, betas=(0.2, 0.5))],  # beta1 < 0.5 takes lerp's other formula
    "AdamW": [dict(lr=1e-2), dict(lr=1e-2, amsgrad=True)],
    "Adadelta": [dict(), dict(lr=0.5, rho=0.95, eps=1e-5, weight_decay=0.1, maximize=True)],
}
CASES = [(name, kw) for name, kws in CONFIGS.items() for kw in kws]
SIZES = (0, 1, 7, 4097, 16385)  # 16385: a chunk boundary and a one-element tail chunk
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def run(name, kwargs, dtype, backend, device, steps=6):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(n, generator=gen, dtype=torch.float32).to(dtype).to(device).requires_grad_() for n in SIZES]
    opt = getattr(pyfused.optim, name)(params, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype).to(device)
        with pyfused.use_backend(backend):
            opt.step()
    states = [{k: v.cpu() for k, v in opt.state[p].items()} for p in params]
    return [p.detach().cpu() for p in params], states


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_triton_matches_cpp_bit_for_bit(name, kwargs, dtype):
    if not _fma_rounds_once():
        pytest.skip("this triton's interpreter rounds tl.fma twice (x * y + z); compiled, and in "
                    "triton 3.9's interpreter, it rounds once like the C++ build's fma")
    if _cpp.isa() == "baseline":
        pytest.skip("the C++ baseline build (no FMA on this CPU, or PYFUSED_CPU_ISA=baseline) rounds a * b + c "
                    "twice where the Triton kernels fuse it: bitwise agreement holds with the avx2/avx512 builds")
    cpp_params, cpp_states = run(name, kwargs, dtype, "cpp", torch.device("cpu"))
    tri_params, tri_states = run(name, kwargs, dtype, "triton", DEVICE)
    moved = sum(int((p != torch.zeros_like(p)).sum()) for p in cpp_params)
    assert moved > 0
    for i, (a, b) in enumerate(zip(tri_params, cpp_params)):
        assert torch.equal(a, b), f"param {i} differs in {int((a != b).sum())} elements"
    for i, (a, b) in enumerate(zip(tri_states, cpp_states)):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"state {key!r} of param {i} differs"


def test_lr_schedule_never_recompiles(monkeypatch):
    """lr, betas and the step count are runtime values: 50 steps under a cosine schedule launch
    one kernel variant. (Compiled, the JIT cache holds one kernel; the interpreter has no cache,
    so there the launch specializations are counted.)"""
    from pyfused.kernels import multi_tensor

    kernel = multi_tensor.optimizer_kernel
    keys = set()
    run_original = kernel.run

    def recording_run(*args, **kwargs):
        constexprs = tuple(sorted((k, str(v)) for k, v in kwargs.items() if k.isupper()))
        ints = tuple((a == 1, a % 16 == 0) for a in args if isinstance(a, int))
        keys.add((constexprs, ints))
        return run_original(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", recording_run)
    params = [torch.randn(n, device=DEVICE, requires_grad=True) for n in (5, 300)]
    opt = pyfused.optim.AdamW(params, lr=1e-2)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=50)
    for _ in range(50):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        schedule.step()
    assert len(keys) == 1, keys
    if DEVICE.type == "cuda":
        assert sum(len(c) for c in kernel.device_caches[torch.cuda.current_device()][:1]) == 1
