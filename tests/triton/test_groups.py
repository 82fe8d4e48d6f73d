"""Param groups batched together on the Triton backend: one launch per (device, dtype) and state
layout whatever the group count, each group's hyperparameters its own (bit for bit what one
optimizer per group computes), and hyperparameter changes (a scheduler's lr, weight decay switched
off) never compile another kernel variant."""

import pytest
import torch

import pyfused
from triton_suite import DEVICE

GROUPS = {  # (constructor kwargs, per-group options): scalars only, one state layout
    "SGD": ({"lr": 1e-3, "momentum": 0.9}, [{}, {"lr": 3e-3, "weight_decay": 0.1}, {"nesterov": True, "maximize": True},
                                            {"momentum": 0.5, "dampening": 0.1}]),
    "Adagrad": ({"lr": 1e-2}, [{}, {"weight_decay": 0.1, "lr_decay": 0.01}, {"maximize": True}]),
    "RMSprop": ({"lr": 1e-3, "momentum": 0.5}, [{}, {"weight_decay": 0.1}, {"alpha": 0.9, "maximize": True}]),
    "Adam": ({"lr": 1e-3}, [{}, {"lr": 3e-3, "weight_decay": 0.1}, {"betas": (0.3, 0.9), "maximize": True}]),
    "AdamW": ({"lr": 1e-3}, [{}, {"weight_decay": 0.0}, {"betas": (0.8, 0.99), "eps": 1e-6}]),
    "Adadelta": ({"lr": 1.0}, [{}, {"weight_decay": 0.1}, {"rho": 0.95, "maximize": True}]),
}
SIZES = (0, 1, 7, 130)
DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def params_for(n_groups):
    gen = torch.Generator().manual_seed(0)
    return [[torch.randn(n, generator=gen).to(DTYPES[(i + k) % len(DTYPES)]).to(DEVICE).requires_grad_()
             for k, n in enumerate(SIZES)] for i in range(n_groups)]


def grads_for(n_groups, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [[torch.randn(n, generator=gen).to(DTYPES[(i + k) % len(DTYPES)]).to(DEVICE) for k, n in enumerate(SIZES)]
            for i in range(n_groups)]


@pytest.fixture
def launches(monkeypatch):
    """The constexprs and int specializations of each optimizer launch."""
    from pyfused.kernels import multi_tensor

    kernel, seen = multi_tensor.optimizer_kernel, []
    run_original = kernel.run

    def recording_run(*args, **kwargs):
        constexprs = tuple(sorted((k, str(v)) for k, v in kwargs.items() if k.isupper()))
        ints = tuple((a == 1, a % 16 == 0) for a in args if isinstance(a, int))
        seen.append((constexprs, ints))
        return run_original(*args, **kwargs)

    monkeypatch.setattr(kernel, "run", recording_run)
    return seen


@pytest.mark.parametrize("name", list(GROUPS))
def test_one_launch_per_dtype_and_bits_of_one_optimizer_per_group(name, launches):
    kwargs, options = GROUPS[name]
    cls = getattr(pyfused.optim, name)
    batched_params = params_for(len(options))
    batched = cls([{"params": ps, **o} for ps, o in zip(batched_params, options)], **kwargs)
    alone_params = params_for(len(options))
    alone = [cls([{"params": ps, **o}], **kwargs) for ps, o in zip(alone_params, options)]
    for step in range(5):
        for lists in (batched_params, alone_params):
            for ps, gs in zip(lists, grads_for(len(options), step)):
                for p, g in zip(ps, gs):
                    p.grad = g
        launches.clear()
        batched.step()
        assert len(launches) == len(DTYPES), launches  # one per (device, dtype)
        for opt in alone:
            opt.step()
    for i, (p, q) in enumerate(zip(sum(batched_params, []), sum(alone_params, []))):
        assert torch.equal(p, q), f"param {i} differs"
        for key, value in alone[i // len(SIZES)].state[q].items():
            assert torch.equal(batched.state[p][key], value), f"param {i} state {key!r} differs"


def test_hyperparameter_changes_never_recompile(launches):
    """Per-group schedules, weight decay switched off and on, maximize flipped: one variant."""
    params = params_for(3)
    opt = pyfused.optim.Adam([{"params": ps, "weight_decay": 0.1 * i} for i, ps in enumerate(params)], lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.9**s, lambda s: 1 / (1 + s), lambda s: 1.0])
    for step in range(8):
        for ps, gs in zip(params, grads_for(3, step)):
            for p, g in zip(ps, gs):
                p.grad = g
        opt.param_groups[1]["weight_decay"] = 0.0 if step % 2 else 0.1
        opt.param_groups[2]["maximize"] = step % 3 == 0
        opt.step()
        schedule.step()
    assert len(launches) == 8 * len(DTYPES)
    assert len(set(launches)) == len(DTYPES), set(launches)  # one variant per dtype, all steps
