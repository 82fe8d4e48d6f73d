"""Clipping: pyfused.nn.utils' global norm, and clip + AdamW, against torch.

- norm alone (fp32 grads, p = 2): pyfused.nn.utils.get_total_norm against torch's
  get_total_norm(foreach=True) and its for-loop (foreach=False). Counted: one read of the grads,
  4 B/element; %bw is the share of the read probe. The in-cache cases (one thread, 32Ki values =
  128 KiB, and 256Ki = 1 MiB) are also timed against torch.linalg.vector_norm, the kernel torch's
  for-loop calls per tensor; the larger one shows the kernel's speed past the per-call cost.
- clip + AdamW step, clip_grad_norm_ then step():
    pyfused-fused:   clip_grad_norm_(..., optimizer=opt), the coefficient applied inside the AdamW
                     kernel: 32 B/element = norm read 4 + AdamW 28;
    pyfused-unfused: clip_grad_norm_ scales the grads in place, then AdamW: 40 B/element;
    torch:           clip_grad_norm_(foreach=True) + AdamW(fused=True): 40 B/element = norm read 4
                     + scale read and write 8 + AdamW 28 (read param, grad, exp_avg, exp_avg_sq;
                     write param, exp_avg, exp_avg_sq).
  Call k of each path clips with max_norm = 0.5 * |g0| * 0.99**k: the coefficient is below 1 at
  every call on every path (extra `max_clip_coef` in the rows), every path feeds AdamW the same
  clipped grads, and no restore pass is timed. `check` compares the params with torch's.
"""

from __future__ import annotations

import math

import torch

import pyfused
import pyfused.nn.utils

from .harness import Cell, Config, Run, Target

WORKLOADS = {
    "large": ("150 x 65,536", [(65536,)] * 150),
    "small": ("2,000 x 1,024", [(1024,)] * 2000),
    "cache-1t": ("1 x 32,768, one thread, in cache", [(32768,)]),
    # 1 MiB, still in L2 here: against cache-1t, separates the per-call cost from the kernel's speed
    "cache-1t-256Ki": ("1 x 262,144, one thread, in L2", [(262144,)]),
}
CLIP_START, CLIP_DECAY = 0.5, 0.99
NORM = {
    "pyfused": lambda grads: pyfused.nn.utils.get_total_norm(grads, 2.0),
    "torch-foreach": lambda grads: torch.nn.utils.get_total_norm(grads, 2.0, foreach=True),
    "torch-forloop": lambda grads: torch.nn.utils.get_total_norm(grads, 2.0, foreach=False),
    "torch-vector_norm": lambda grads: torch.linalg.vector_norm(grads[0]),  # one tensor only
}
STEP_BYTES = {"pyfused-fused": 32, "torch": 40, "pyfused-unfused": 40}  # the second: the reference


def grads_for(cfg: Config, shapes):
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator).to(cfg.device) for s in shapes]
    return params, [(torch.randn(s, generator=generator) * 1e-2).to(cfg.device) for s in shapes]


def norm_cell(cfg: Config, table: str, workload: str, desc: str, shapes, impls, **options) -> Cell:
    shapes = cfg.shapes(shapes)
    numel = sum(math.prod(s) for s in shapes)

    def setup():
        grads = grads_for(cfg, shapes)[1]
        exact = math.sqrt(sum(float(g.double().square().sum()) for g in grads))

        def factory(impl):
            fn = NORM[impl]
            return lambda: Run(lambda: fn(grads), outputs=lambda: [fn(grads)],
                               extra=lambda: {"rel_error_vs_float64": abs(float(fn(grads)) - exact) / exact})

        return {impl: factory(impl) for impl in impls}

    # rtol 3e-4: torch's fp32 norm of one 4Mi-value tensor is 9e-5 off float64 here (pyfused's ~1e-8,
    # in the rows as rel_error_vs_float64); a wrong kernel is off by far more
    return Cell("clip", table, "norm", workload, desc, len(shapes), numel, 4 * numel, setup, bandwidth="read",
                tol=(3e-4, 0.0), **options)


class ClipStep:
    """One clip + AdamW path on its own params, grads and AdamW state (schedule: module docstring)."""

    def __init__(self, impl, params, grads, start_norm):
        self.impl, self.calls, self.seen = impl, 0, []
        self.params = [p.clone().requires_grad_(True) for p in params]
        for p, g in zip(self.params, grads):
            p.grad = g.clone()
        self.opt = torch.optim.AdamW(self.params, fused=True) if impl == "torch" else pyfused.optim.AdamW(self.params)
        self.max_norm0 = CLIP_START * start_norm

    def __call__(self):
        max_norm = self.max_norm0 * CLIP_DECAY**self.calls
        self.calls += 1
        if self.impl == "torch":
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        elif self.impl == "pyfused-fused":
            norm = pyfused.nn.utils.clip_grad_norm_(self.params, max_norm, optimizer=self.opt)
        else:
            norm = pyfused.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.opt.step()
        self.seen.append((max_norm, norm))  # no host sync on CUDA: read after timing

    def run(self) -> Run:
        return Run(self, outputs=lambda: self.params,
                   extra=lambda: {"max_clip_coef": max(m / (float(n) + 1e-6) for m, n in self.seen)})


def step_cell(cfg: Config, workload: str) -> Cell:
    desc, shapes = WORKLOADS[workload]
    shapes = cfg.shapes(shapes)
    numel = sum(math.prod(s) for s in shapes)

    def setup():
        params, grads = grads_for(cfg, shapes)
        start = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        return {impl: (lambda impl=impl: ClipStep(impl, params, grads, start).run()) for impl in STEP_BYTES}

    return Cell("clip", "clip_grad_norm_ + AdamW step, fp32", "clip+AdamW", workload, desc, len(shapes), numel,
                {impl: b * numel for impl, b in STEP_BYTES.items()}, setup, ours="pyfused-fused",
                show={"coef": "max_clip_coef"})


def cells(cfg: Config) -> list[Cell]:
    main = ("pyfused", "torch-foreach", "torch-forloop")
    out = [norm_cell(cfg, "global 2-norm alone, fp32 grads", w, *WORKLOADS[w], main) for w in ("large", "small")]
    if cfg.cpu:
        out += [norm_cell(cfg, "global 2-norm, one thread, in cache", w, *WORKLOADS[w],
                          ("pyfused", "torch-vector_norm", "torch-foreach"), one_thread=True, repeat=50)
                for w in ("cache-1t", "cache-1t-256Ki")]
    out += [step_cell(cfg, w) for w in ("large", "small")]
    for size in cfg.pick([4096, 65536, 2**20], [2**k for k in range(10, 23, 2)], [256, 1024]):
        shapes = cfg.shapes([(size,)] * 8)
        out.append(norm_cell(cfg, "global 2-norm, GB/s against tensor size (8 tensors)", f"size:{shapes[0][0]}",
                             f"8 x {shapes[0][0]:,}", shapes, main[:2], sweep="size", x=shapes[0][0]))
    for count in cfg.pick([1, 64, 4096], [4**k for k in range(8)], [1, 64]):
        shapes = cfg.shapes([(2**22 // count,)] * count)
        out.append(norm_cell(cfg, "global 2-norm, GB/s against tensor count (4Mi values)", f"count:{len(shapes)}",
                             f"{len(shapes):,} x {shapes[0][0]:,}", shapes, main[:2], sweep="count", x=len(shapes)))
    return out


TARGETS = [
    Target("issue 4", "cpu", "norm", "large", "share", 0.90),
    Target("issue 9", "cpu", "norm", "large", "speedup", 1.2, ("torch-foreach",)),
    Target("issue 9", "cpu", "norm", "cache-1t", "speedup", 1.0, ("torch-vector_norm",)),
    Target("issue 4", "cpu", "clip+AdamW", "large", "speedup", 1.3, ("torch",), impl="pyfused-fused"),
    Target("issue 4", "cpu", "clip+AdamW", "small", "speedup", 10.0, ("torch",), impl="pyfused-fused"),
]
