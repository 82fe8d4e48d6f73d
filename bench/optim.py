"""Optimizers: pyfused.optim against torch.optim's for-loop, foreach and fused paths.

One timed call is `opt.step()` on fp32 params whose grads persist. Bytes counted per element, the
compulsory traffic of one step (4 B a value):
  Adam, AdamW: read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq = 28 B;
  SGD (momentum), Adagrad, RMSprop: read param, grad, one state; write param, the state = 20 B.
Workloads that fit the last-level cache can exceed the DRAM probes. After timing, all paths have
run the same steps from the same params on the same grads; `check` compares their params with the
for-loop's (a fast path that computed something else would show as MISMATCH).
"""

from __future__ import annotations

import math

import torch

import pyfused

from .harness import Cell, Config, Run, Target

OPTIMIZERS = {  # name: (hyperparameters, bytes counted per element)
    "SGD": ({"lr": 1e-3, "momentum": 0.9}, 20),
    "Adagrad": ({}, 20),
    "RMSprop": ({}, 20),
    "Adam": ({}, 28),
    "AdamW": ({}, 28),
    "Adadelta": ({}, 28),  # read param, grad, square_avg, acc_delta; write param and both states
}
IMPLS = ("pyfused", "torch-forloop", "torch-foreach", "torch-fused")
FLAT = "pyfused-flat"  # pyfused with flat=True: params, grads and state in arenas (pyfused/optim/_arena.py)


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """The parameters of GPT-2 small (124,439,808 values; the LM head is tied to wte)."""
    d, layers = 768, 12
    per_layer = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(50257, d), (1024, d)] + per_layer * layers + [(d,), (d,)]


WORKLOADS = {  # name: (what, shapes, the implementations timed)
    # pyfused-stats: pyfused with track_stats=True, whose cost the pyfused column's ratio shows
    "large": ("150 x 65,536", [(65536,)] * 150, IMPLS + ("pyfused-stats",)),
    "small": ("2,000 x 1,024", [(1024,)] * 2000, IMPLS + (FLAT,)),
    # per-layer lr and no weight decay on every other group: torch makes a call per group, pyfused one
    "groups": ("500 groups x 4 x 1,024", [(1024,)] * 2000, IMPLS),
    "mixed": ("2 x 4Mi + 500 x 1,024 + 500 x 64", [(4 * 2**20,)] * 2 + [(1024,)] * 500 + [(64,)] * 500,
              IMPLS + (FLAT,)),
    "gpt2": ("GPT-2 small, 148 tensors, 124M values", gpt2_small_shapes(), IMPLS),
    # 2,000 one-element tensors: the step is per-call and per-tensor host work (the for-loop adds nothing)
    "host": ("2,000 x 1 (host cost)", [(1,)] * 2000, ("pyfused", "torch-foreach", "torch-fused", FLAT)),
    # one thread, param + grad + state in L2 (AdamW: 4 x 32 KiB): compute-bound kernels show here
    "cache-1t": ("1 x 8,192, one thread, in cache", [(8192,)], ("pyfused", "torch-fused", "torch-foreach")),
}
MAIN = "optimizer step, fp32"


GROUP_SIZE = {"groups": 4}  # tensors per param group where a workload has many groups


def param_groups(params: list[torch.Tensor], size: int, lr: float) -> list[dict]:
    """Groups of `size` params with lrs from lr / 4 to lr, and weight decay 0.01 on every other one."""
    return [{"params": params[i : i + size], "lr": lr * (1 + k % 4) / 4, "weight_decay": 0.01 * (k % 2)}
            for k, i in enumerate(range(0, len(params), size))]


def optimizer(impl: str, name: str, params: list[torch.Tensor], **kwargs):
    if impl in ("pyfused", "pyfused-stats", FLAT):  # flat=True copies the grads set before it into its arena
        return getattr(pyfused.optim, name)(params, **kwargs, flat=impl == FLAT, track_stats=impl == "pyfused-stats")
    flag = {"torch-forloop": {"foreach": False}, "torch-foreach": {"foreach": True}, "torch-fused": {"fused": True}}
    return getattr(torch.optim, name)(params, **kwargs, **flag[impl])


def cell(cfg: Config, table: str, name: str, workload: str, desc: str, shapes, impls, **options) -> Cell:
    hyper, per_element = OPTIMIZERS[name]
    shapes = cfg.shapes(shapes)
    numel = sum(math.prod(s) for s in shapes)

    def setup():
        generator = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=generator).to(cfg.device) for s in shapes]
        grads = [(torch.randn(s, generator=generator) * 1e-2).to(cfg.device) for s in shapes]

        def factory(impl):
            def make():
                own = [p.clone().requires_grad_(True) for p in params]
                for p, g in zip(own, grads):
                    p.grad = g  # only read: shared by every path
                groups = own
                if workload in GROUP_SIZE:
                    lr = hyper.get("lr", getattr(torch.optim, name)([torch.zeros(1)]).defaults["lr"])
                    groups = param_groups(own, GROUP_SIZE[workload], lr)
                return Run(optimizer(impl, name, groups, **hyper).step, outputs=lambda: own)
            return make

        return {impl: factory(impl) for impl in impls}

    return Cell("optim", table, name, workload, desc, len(shapes), numel, numel * per_element, setup, **options)


def sweeps(cfg: Config) -> list[Cell]:
    """AdamW's GB/s against tensor size (8 tensors) and against tensor count (4Mi values in all)."""
    impls, out = ("pyfused", "torch-foreach", "torch-fused"), []
    for size in cfg.pick([4096, 65536, 2**20], [2**k for k in range(10, 23, 2)], [256, 1024]):
        shapes = cfg.shapes([(size,)] * 8)
        out.append(cell(cfg, "AdamW, GB/s against tensor size (8 tensors)", "AdamW", f"size:{shapes[0][0]}",
                        f"8 x {shapes[0][0]:,}", shapes, impls, sweep="size", x=shapes[0][0]))
    for count in cfg.pick([1, 64, 4096], [4**k for k in range(8)], [1, 64]):
        shapes = cfg.shapes([(2**22 // count,)] * count)
        out.append(cell(cfg, "AdamW, GB/s against tensor count (4Mi values)", "AdamW", f"count:{len(shapes)}",
                        f"{len(shapes):,} x {shapes[0][0]:,}", shapes, impls, sweep="count", x=len(shapes)))
    return out


def cells(cfg: Config) -> list[Cell]:
    workloads = ["large", "small", "groups", "mixed"] + (["gpt2"] if cfg.device.type == "cuda" else []) + ["host"]
    out = [cell(cfg, MAIN if w != "host" else "optimizer step, host cost (one-element tensors)", name, w,
                *WORKLOADS[w]) for w in workloads for name in OPTIMIZERS]
    if cfg.cpu:
        out += [cell(cfg, "optimizer step, one thread, in cache", name, "cache-1t", *WORKLOADS["cache-1t"],
                     one_thread=True, repeat=20) for name in OPTIMIZERS]
    return out + sweeps(cfg)


ALL = tuple(OPTIMIZERS)
FUSED = ("torch-fused", "torch-foreach")  # torch has no fused RMSprop: then its foreach path
TARGETS = [
    *[Target("issue 2", "cpu", o, "large", "speedup", 1.2, FUSED) for o in ("Adam", "AdamW", "SGD", "Adagrad")],
    Target("issue 2", "cpu", "RMSprop", "large", "speedup", 3.0, ("torch-foreach",)),
    *[Target("issue 2", "cpu", o, "small", "speedup", 8.0, FUSED) for o in ALL],
    *[Target("issue 2", "cpu", o, "mixed", "speedup", 2.0, FUSED) for o in ALL],
    *[Target("issue 2", "cpu", o, "host", "us_per_tensor", 1.0) for o in ALL],
    *[Target("issue 10", "cpu", o, "groups", "speedup", 8.0, FUSED) for o in ALL],
    *[Target("issue 10", "cpu", o, "small", "speedup", 8.0, FUSED, impl=FLAT) for o in ("Adam", "AdamW")],
    *[Target("issue 10", "cpu", o, "mixed", "speedup", 2.0, FUSED, impl=FLAT) for o in ALL],
    *[Target("issue 10", "cpu", o, "host", "us_per_tensor", 0.1, impl=FLAT) for o in ALL],
    # track_stats=True costs <= 5% of the step: the plain step at least 1 / 1.05 of the stats one's speed
    *[Target("issue 11", "cpu", o, "large", "speedup", 1 / 1.05, ("pyfused",), impl="pyfused-stats") for o in ALL],
    Target("issue 11", "cpu", "Adadelta", "large", "share", 0.95),
    *[Target("issue 3", "cuda", o, "large", "share", 0.85) for o in ALL],
    *[Target("issue 3", "cuda", o, "small", "speedup", 1.0, FUSED) for o in ALL],
    *[Target("issue 3", "cuda", o, w, "speedup", 3.0, ("torch-foreach",)) for w in ("large", "small", "mixed", "gpt2")
      for o in ALL],
]
