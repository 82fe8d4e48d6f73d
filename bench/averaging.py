"""Weight averaging: pyfused.optim.swa_utils.AveragedModel.update_parameters against torch's, EMA
(decay 0.999, torch's get_ema_multi_avg_fn against ours), fp32 params in a ParameterList.

One timed call is one update_parameters(model) after the first (which copies). Counted: read the
average and the model, write the average = 12 B/element. Both paths lerp the same averages (set
apart from the model in setup, so every call moves them) towards the same model and have run the
same calls when `check` compares them, exactly (rtol = atol = 0: pyfused rounds as torch does).
torch's figure includes its per-tensor Python work (detach, .to, grouping) and, on CPU, where it has
no foreach kernels, one lerp_ per tensor; pyfused's includes walking both models' parameters and
checking the cached address table against them. The in-cache case (one thread, 3 x 128 KiB) is
the kernel's speed past the per-call cost.

Fused into the step ("step+EMA", large): pyfused.optim.Adam(..., average=averaged) against
pyfused's Adam step then update_parameters(model), fp32, the same grads every call. Counted: Adam's
28 B/element (param, exp_avg, exp_avg_sq read and written, grad read), plus the average read and
written (8 B) fused, or the average written and it and the param read again (12 B) apart. Both
paths start from the same params and averages and end equal, exactly.

On large, torch's time is near the copy probe already (its share of it is `share_of_bandwidth` in
the torch rows of bench.jsonl; about 105% on the Zen 5 host), so the 3x target there needs
pyfused at about three times the copy probe's rate, while it moves 12 B/element at about 1.4 times
it (part of the 79 MB working set stays in the last-level cache between calls).
"""

from __future__ import annotations

import math

import torch
from torch.optim import swa_utils as torch_swa

import pyfused.optim
from pyfused.optim import swa_utils

from .harness import Cell, Config, Run, Target

DECAY = 0.999
WORKLOADS = {
    "large": ("150 x 65,536", [(65536,)] * 150),
    "small": ("2,000 x 1,024", [(1024,)] * 2000),
    "cache-1t": ("1 x 32,768, one thread, in cache", [(32768,)]),
}
IMPLS = {"pyfused": swa_utils, "torch": torch_swa}


def cell(cfg: Config, table: str, workload: str, **options) -> Cell:
    desc, shapes = WORKLOADS[workload]
    shapes = cfg.shapes(shapes)
    numel = sum(math.prod(s) for s in shapes)

    def setup():
        generator = torch.Generator().manual_seed(0)
        model = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes])
        model.to(cfg.device)
        offsets = [torch.randn(s, generator=generator).to(cfg.device) for s in shapes]

        def factory(module):
            def make():
                averaged = module.AveragedModel(model, multi_avg_fn=module.get_ema_multi_avg_fn(DECAY))
                averaged.update_parameters(model)  # the copy
                with torch.no_grad():
                    for p, offset in zip(averaged.parameters(), offsets):
                        p.add_(offset)
                return Run(lambda: averaged.update_parameters(model), outputs=lambda: list(averaged.parameters()))
            return make

        return {impl: factory(module) for impl, module in IMPLS.items()}

    return Cell("averaging", table, "EMA", workload, desc, len(shapes), numel, 12 * numel, setup,
                tol=(0.0, 0.0), **options)


def step_cell(cfg: Config, workload: str) -> Cell:
    desc, shapes = WORKLOADS[workload]
    shapes = cfg.shapes(shapes)
    numel = sum(math.prod(s) for s in shapes)

    def setup():
        generator = torch.Generator().manual_seed(0)
        values = [torch.randn(s, generator=generator) for s in shapes]
        grads = [(torch.randn(s, generator=generator) * 0.01).to(cfg.device) for s in shapes]

        def factory(fused):
            def make():
                model = torch.nn.ParameterList([torch.nn.Parameter(v.clone()) for v in values]).to(cfg.device)
                averaged = swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(DECAY))
                averaged.update_parameters(model)  # the copy; n_averaged 1 for both
                opt = pyfused.optim.Adam(model.parameters(), lr=1e-3, average=averaged if fused else None)
                for p, g in zip(model.parameters(), grads):
                    p.grad = g

                def call():
                    opt.step()
                    if not fused:
                        averaged.update_parameters(model)

                return Run(call, outputs=lambda: list(averaged.parameters()))
            return make

        return {"fused": factory(True), "separate": factory(False)}

    return Cell("averaging", "Adam step + AveragedModel EMA, fp32", "step+EMA", workload, desc, len(shapes), numel,
                {"fused": 36 * numel, "separate": 40 * numel}, setup, ours="fused", tol=(0.0, 0.0))


def cells(cfg: Config) -> list[Cell]:
    out = [cell(cfg, "AveragedModel.update_parameters, EMA, fp32", w) for w in ("large", "small")]
    out.append(step_cell(cfg, "large"))
    if cfg.cpu:
        out.append(cell(cfg, "AveragedModel.update_parameters, EMA, one thread, in cache", "cache-1t",
                        one_thread=True, repeat=20))
    return out


TARGETS = [
    Target("issue 11", "cpu", "EMA", "large", "speedup", 3.0, ("torch",)),
    Target("issue 11", "cpu", "EMA", "small", "speedup", 10.0, ("torch",)),
    Target("issue 11", "cpu", "step+EMA", "large", "speedup", 1.1, ("separate",), impl="fused"),
]
