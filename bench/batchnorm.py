"""Batch normalization: pyfused.nn.BatchNorm1d/2d and BatchNormReLU2d against torch's, fp32.

Counted, in passes over the activation (size = bytes of the input):
- training forward: the statistics read x once (each partition twice while it is in cache), the
  normalization reads x and writes y: 3 x size;
- forward + backward: forward 3, then the grad sums read dy and x, and dx reads dy and x and writes
  dx: 8 x size. torch's paths are counted the same, what the op needs;
- eval forward: read x, write y: 2 x size.
BN+ReLU is pyfused's fused module against torch's BatchNorm2d then ReLU. `check` compares y, dx,
dweight and dbias with torch's modules run in float64 (the torch-float64 column, timed too but not
a target's baseline): torch's own fp32 channels_last backward is not a usable reference, its dx
and dbias at (32, 64, 56, 56) are off by up to 0.26 and 0.53 (pyfused's by 3e-7 and 3e-5), which
its row's MISMATCH shows. The in-cache case is (8, 32, 16, 16) on one thread.
"""

from __future__ import annotations

import math

import torch

import pyfused.nn as PN

from .harness import Cell, Config, Run, Target

WORKLOADS = {  # key: (shape, channels_last, what)
    "32x64x56x56": ((32, 64, 56, 56), False, "(32, 64, 56, 56)"),
    "32x64x56x56-cl": ((32, 64, 56, 56), True, "(32, 64, 56, 56) channels_last"),
    "256x1024": ((256, 1024), False, "(256, 1024), BatchNorm1d"),
    "cache-1t": ((8, 32, 16, 16), False, "(8, 32, 16, 16), one thread, in cache"),
}


def modules(shape, relu):
    """pyfused's module, the reference (torch's in float64), torch's: the harness checks against
    the second."""
    channels = shape[1]
    if len(shape) == 2:
        torch_module = lambda: torch.nn.BatchNorm1d(channels)  # noqa: E731
        ours = PN.BatchNorm1d(channels)
    elif relu:
        torch_module = lambda: torch.nn.Sequential(torch.nn.BatchNorm2d(channels), torch.nn.ReLU())  # noqa: E731
        ours = PN.BatchNormReLU2d(channels)
    else:
        torch_module = lambda: torch.nn.BatchNorm2d(channels)  # noqa: E731
        ours = PN.BatchNorm2d(channels)
    return {"pyfused": ours, "torch-float64": torch_module().double(), "torch": torch_module()}


def bn_cell(cfg: Config, workload: str, mode: str, relu: bool = False, **options) -> Cell:
    shape, channels_last, desc = WORKLOADS[workload]
    if cfg.mode == "tiny":
        shape = (4, 8, 4, 4) if len(shape) == 4 else (8, 16)
    numel = math.prod(shape)
    backward = mode == "fwd+bwd"

    def setup():
        generator = torch.Generator().manual_seed(0)
        x = (torch.randn(shape, generator=generator) * 2 + 0.5).to(cfg.device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(backward)
        grad = torch.randn(shape, generator=generator).to(cfg.device)

        wide_x = x.detach().double().requires_grad_(backward)

        def factory(impl):
            module = modules(shape, relu)[impl].to(cfg.device).train(mode != "eval")
            params = list(module.parameters())
            inputs, dy = (wide_x, grad.double()) if impl == "torch-float64" else (x, grad)
            last = {}

            def call():
                y = module(inputs)
                if backward:
                    last["grads"] = torch.autograd.grad(y, [inputs, *params], dy)
                last["y"] = y

            def outputs():
                return [last["y"].detach(), *last.get("grads", [])]

            return Run(call, outputs=outputs)

        return {impl: (lambda impl=impl: factory(impl)) for impl in ("pyfused", "torch-float64", "torch")}

    passes = {"fwd": 3, "fwd+bwd": 8, "eval": 2}[mode]
    op = ("BN+ReLU " if relu else "BN ") + mode
    title = ("BatchNorm + ReLU" if relu else "BatchNorm") + {"fwd": ", training forward", "fwd+bwd":
             ", training forward + backward", "eval": ", eval forward"}[mode] + ", fp32"
    # rtol/atol 1e-4: fp32 outputs of unit scale; pyfused's statistics are computed in double and
    # torch's in float, ~1e-6 apart, dx is a cancellation of terms of that scale
    return Cell("batchnorm", title, op, workload, desc if cfg.mode != "tiny" else str(shape), 1, numel,
                passes * 4 * numel, setup, tol=(1e-4, 1e-4), **options)


def cells(cfg: Config) -> list[Cell]:
    out = [bn_cell(cfg, w, mode) for mode in ("fwd", "fwd+bwd") for w in ("32x64x56x56", "32x64x56x56-cl")]
    out += [bn_cell(cfg, "32x64x56x56", "fwd+bwd", relu=True), bn_cell(cfg, "32x64x56x56-cl", "fwd+bwd", relu=True),
            bn_cell(cfg, "256x1024", "fwd+bwd"), bn_cell(cfg, "32x64x56x56", "eval")]
    if cfg.cpu:
        out.append(bn_cell(cfg, "cache-1t", "fwd+bwd", one_thread=True, repeat=10))
    return out


TARGETS = [
    Target("issue 8", "cpu", "BN fwd+bwd", "32x64x56x56", "speedup", 2.0, ("torch",)),
    Target("issue 8", "cpu", "BN fwd+bwd", "32x64x56x56-cl", "speedup", 2.0, ("torch",)),
    Target("issue 8", "cpu", "BN+ReLU fwd+bwd", "32x64x56x56", "speedup", 3.0, ("torch",)),
    Target("issue 8", "cpu", "BN fwd+bwd", "256x1024", "speedup", 1.0, ("torch",)),
    Target("issue 8", "cuda", "BN fwd+bwd", "32x64x56x56", "share", 0.70),
]
