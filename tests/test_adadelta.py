"""Adadelta rounds exactly as torch's CPU kernels do (the rest of its coverage is table rows:
optim_cases.CASES, test_optim_api, test_grad_scaler, clip_cases.FUSED and the Triton suites).

One step from random state, against torch's for-loop: square_avg (addcmul with FMA, in torch
and in pyfused) is bit-identical everywhere, and param and acc_delta everywhere torch's two
square roots are correctly rounded. Where torch's CPU sqrt is 1 ulp off, pyfused (correctly
rounded) may differ; that is the only difference allowed. With twice-rounded addcmul/add(alpha)
(the baseline build's arithmetic) square_avg differs and this test fails.
"""

import pytest
import torch

import pyfused


def _correctly_rounded_sqrt(x):
    # float32's correctly rounded square root: float64's, rounded once more (53 >= 2 * 24 + 2).
    return x.double().sqrt().float()


@pytest.mark.parametrize("weight_decay, maximize", [(0.0, False), (0.1, True)])
def test_one_step_bitwise_except_where_torchs_sqrt_is_off(weight_decay, maximize):
    gen = torch.Generator().manual_seed(0)
    n = 100_003
    p0 = torch.randn(n, generator=gen)
    grad = torch.randn(n, generator=gen) * 0.5
    square_avg, acc_delta = torch.rand(n, generator=gen) * 0.1, torch.rand(n, generator=gen) * 1e-3
    out = {}
    for name, cls, extra in (("ours", pyfused.optim.Adadelta, {}), ("torch", torch.optim.Adadelta, {"foreach": False})):
        p = torch.nn.Parameter(p0.clone())
        opt = cls([p], lr=1.0, rho=0.9, eps=1e-6, weight_decay=weight_decay, maximize=maximize, **extra)
        p.grad = grad.clone()
        opt.step()  # creates the state; then the step under test from the chosen state
        with torch.no_grad():
            p.copy_(p0)
        opt.state[p]["square_avg"].copy_(square_avg)
        opt.state[p]["acc_delta"].copy_(acc_delta)
        opt.step()
        out[name] = (p.detach().clone(), opt.state[p]["square_avg"].clone(), opt.state[p]["acc_delta"].clone())
    (p_ours, sq_ours, acc_ours), (p_torch, sq_torch, acc_torch) = out["ours"], out["torch"]
    assert torch.equal(sq_ours, sq_torch), "square_avg (addcmul) does not round as torch's does"
    # torch's two square roots, on the values torch took them of
    std_in, delta_in = sq_torch + 1e-6, acc_delta + 1e-6
    torch_off = (std_in.sqrt() != _correctly_rounded_sqrt(std_in)) | (delta_in.sqrt() != _correctly_rounded_sqrt(delta_in))
    exact = ~torch_off
    assert exact.float().mean() > 0.5, "too few elements to judge"
    assert torch.equal(p_ours[exact], p_torch[exact]), f"{int((p_ours != p_torch)[exact].sum())} params differ"
    assert torch.equal(acc_ours[exact], acc_torch[exact]), "acc_delta differs where torch's sqrt is exact"
    assert not torch.equal(p_ours, p0), "the step did nothing"
