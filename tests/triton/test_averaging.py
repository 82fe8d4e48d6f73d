"""kernels/averaging.py (the triton backend, autouse in conftest.py) against torch's AveragedModel
and the C++ kernels: EMA and SWA lerps, every dtype, odd sizes and chunk edges, several updates.

Under the interpreter (CPU tensors) torch's reference is its CPU lerp, which rounds as csrc/
optimizers.h's lerp does on an FMA machine and as the kernel does: bit for bit. On CUDA the kernel
is compared bit for bit with the C++ build on CPU copies (the same expression, one fma, the same
weight), and with torch's CUDA foreach lerp within an ulp: nvcc, not this code, picks its fusions.
"""

import pytest
import torch
from torch import nn
from torch.optim import swa_utils as T

import pyfused
from pyfused.optim import swa_utils as P
from test_cpp_vs_triton import _fma_rounds_once
from triton_suite import DEVICE, INTERPRETED

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SIZES = (0, 1, 7, 16385)  # 16385: a chunk edge and a one-element tail chunk
FNS = {
    "ema0.999": (lambda: T.get_ema_multi_avg_fn(0.999), lambda: P.get_ema_multi_avg_fn(0.999)),
    "ema0.3": (lambda: T.get_ema_multi_avg_fn(0.3), lambda: P.get_ema_multi_avg_fn(0.3)),  # weight >= 0.5
    "swa": (T.get_swa_multi_avg_fn, P.get_swa_multi_avg_fn),
}
if DEVICE.type == "cuda":  # the default lerps on CUDA (torch's foreach path); on CPU it divides
    FNS["default"] = (lambda: None, lambda: None)


def model_for(dtype, device):
    gen = torch.Generator().manual_seed(0)
    model = nn.Module()
    model.flat = nn.ParameterList([nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in SIZES])
    model.transposed = nn.Parameter(torch.randn(13, 5, generator=gen).to(dtype).t())
    model.register_buffer("running", torch.randn(33, generator=gen).to(dtype))
    return model.to(device)


def averages(fn_pair, dtype, device, backend, updates=5):
    """The averages after `updates` updates, and torch's, from the same model on `device`."""
    model = model_for(dtype, device)
    theirs = T.AveragedModel(model, multi_avg_fn=fn_pair[0](), use_buffers=True)
    with pyfused.use_backend(backend):
        ours = P.AveragedModel(model, multi_avg_fn=fn_pair[1](), use_buffers=True)
        gen = torch.Generator().manual_seed(1)
        for _ in range(updates):
            with torch.no_grad():
                for t in list(model.parameters()) + list(model.buffers()):
                    t.add_((torch.randn(t.shape, generator=gen) * 0.1).to(dtype).to(device))
            theirs.update_parameters(model)
            ours.update_parameters(model)
        group = ours._plan.groups[0]
        assert len(ours._plan.groups) == 1 and not ours._plan.rest  # all in the kernel:
        assert (group.triton_tables is not None) == (backend == "triton")  # this backend's
    return [t.cpu() for t in theirs.module.state_dict().values()], [t.cpu() for t in ours.module.state_dict().values()]


@pytest.mark.parametrize("fn", list(FNS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_matches_torch(dtype, fn):
    if not _fma_rounds_once():
        pytest.skip("this triton's interpreter rounds tl.fma twice")
    theirs, ours = averages(FNS[fn], dtype, DEVICE, "triton")
    for a, b in zip(theirs, ours):
        if INTERPRETED:
            assert torch.equal(a, b)  # torch's CPU lerp: one fma, as the kernel's
        else:
            # torch's CUDA lerp is fused as nvcc chooses: at most one ulp from this one
            torch.testing.assert_close(b, a, rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).tiny)


@pytest.mark.parametrize("fn", ["ema0.999", "ema0.3", "swa"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
def test_matches_cpp(dtype, fn):
    if not _fma_rounds_once():
        pytest.skip("this triton's interpreter rounds tl.fma twice")
    from pyfused import _cpp

    if _cpp.isa() == "baseline":
        pytest.skip("the baseline C++ build rounds lerp's multiply and add apart; the kernel fuses them")
    triton_result = averages(FNS[fn], dtype, DEVICE, "triton")[1]
    cpp_result = averages(FNS[fn], dtype, torch.device("cpu"), "cpp")[1]
    for a, b in zip(cpp_result, triton_result):
        assert torch.equal(a, b)
