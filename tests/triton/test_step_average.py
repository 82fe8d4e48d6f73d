"""average= of the optimizers on the Triton backend (autouse in conftest.py): the step's kernel
lerps each average towards its new param (kernels/multi_tensor.py's AVERAGE), against the same
step followed by AveragedModel.update_parameters, every optimizer, EMA and SWA, odd sizes, two
param groups, GradScaler's skipped step.

Both sides lerp the param as stored with the same expression (kernels/optimizers.py's _lerp, one
fma in opmath): bit for bit against pyfused's update_parameters (kernels/averaging.py) in both
modes, and under the interpreter against torch's CPU lerp too, which rounds the same way (see
tests/triton/test_averaging.py). On CUDA torch's foreach lerp is nvcc's, so it is not compared here.
"""

import pytest
import torch
from torch import nn
from torch.optim import swa_utils as T

import pyfused
from pyfused.optim import swa_utils as P
from triton_suite import DEVICE, INTERPRETED
from test_stats import CONFIGS as OPTIMIZERS  # the stats tests' realistic hyperparameters

FNS = {
    "ema0.9": (lambda: T.get_ema_multi_avg_fn(0.9), lambda: P.get_ema_multi_avg_fn(0.9)),
    "swa": (T.get_swa_multi_avg_fn, P.get_swa_multi_avg_fn),
}
SIZES = (0, 1, 7, 16385)  # 16385: a chunk edge and a one-element tail chunk
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}


def model_for(dtype):
    gen = torch.Generator().manual_seed(0)
    model = nn.Module()
    model.flat = nn.ParameterList([nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in SIZES])
    model.register_buffer("running", torch.randn(33, generator=gen).to(dtype))
    return model.to(DEVICE)


def groups(model, lr):
    params = list(model.parameters())
    return [dict(params=params[:2]), dict(params=params[2:], lr=lr * 10)]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("fn", list(FNS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_average_is_step_then_update_parameters(name, fn, dtype, steps=4):
    kwargs = OPTIMIZERS[name]
    models = [model_for(dtype) for _ in range(3)]
    fused = P.AveragedModel(models[0], multi_avg_fn=FNS[fn][1]())
    apart = P.AveragedModel(models[1], multi_avg_fn=FNS[fn][1]())
    torchs = T.AveragedModel(models[2], multi_avg_fn=FNS[fn][0]())
    opts = [getattr(pyfused.optim, name)(groups(models[0], kwargs["lr"]), **kwargs, average=fused)]
    opts += [getattr(pyfused.optim, name)(groups(m, kwargs["lr"]), **kwargs) for m in models[1:]]
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        grads = [torch.randn(n, generator=gen).to(dtype).to(DEVICE) for n in SIZES]
        for model, opt in zip(models, opts):
            for p, g in zip(model.parameters(), grads):
                p.grad = g.clone()
            model.running.add_(1)
            opt.step()
        apart.update_parameters(models[1])
        torchs.update_parameters(models[2])
    assert fused._plan is None  # the step's kernel averaged: update_parameters never ran
    references = [apart] + ([torchs] if INTERPRETED else [])
    for reference in references:
        for a, b in zip(fused.state_dict().values(), reference.state_dict().values()):
            assert torch.equal(a, b), (a.double() - b.double()).abs().max()
    assert int(fused.n_averaged) == steps


def test_skipped_gradscaler_step_leaves_the_average():
    model = model_for(torch.float32)
    fused = P.AveragedModel(model, multi_avg_fn=P.get_ema_multi_avg_fn(0.9))
    opt = pyfused.optim.Adam(model.parameters(), lr=0.1, average=fused)
    scaler = torch.amp.GradScaler(DEVICE.type, init_scale=1024.0)
    for k in range(3):
        for p in model.parameters():
            p.grad = scaler.scale(torch.ones_like(p))
        if k == 1:
            model.flat[3].grad[5] = float("nan")
            before = {key: t.clone() for key, t in fused.state_dict().items()}
        scaler.step(opt)
        scaler.update()
        if k == 1:
            assert all(torch.equal(before[key], t) for key, t in fused.state_dict().items())
    assert int(fused.n_averaged) == 2 and fused._plan is None


def test_capturable_is_refused():
    model = model_for(torch.float32)
    averaged = P.AveragedModel(model)
    with pytest.raises(ValueError, match="average= does not support capturable=True"):
        pyfused.optim.Adam(model.parameters(), lr=0.1, capturable=True, average=averaged)
    opt = pyfused.optim.Adam(list(model.parameters()), lr=0.1, average=averaged)
    with pytest.raises(RuntimeError, match="average= does not support capturable=True"):
        opt.add_param_group(dict(params=[nn.Parameter(torch.ones(3, device=DEVICE))], capturable=True))
