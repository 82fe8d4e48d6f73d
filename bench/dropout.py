"""Dropout: pyfused.nn.functional.dropout and dropout_add against torch, training mode, p = 0.5.

- dropout forward: read x, write y: 8 B/element (fp32). forward + backward: also read the grad and
  write dx: 16 B/element. torch's dropout also writes and reads a mask (one byte or more per
  element), which is not counted: the figure is the traffic the op needs, not what torch moves.
- dropout_add, residual + dropout(x + bias) (bias along the last dimension), forward + backward:
  read x, residual, write out; read the grad, write dx (the residual's grad is the grad itself):
  20 B/element in fp32, 10 in bf16. torch's path is the unfused expression.
- `torch x*mask` is torch's `input * noise` with the noise already made (0 or 1/(1-p), drawn
  once in setup), forward and backward (`grad * noise`): the cost of torch's dropout without
  drawing the mask, a fresh output's page faults included, as in every path here. It counts
  12 B/element forward (x, noise, y), 24 forward + backward.
- The in-cache case (32Ki fp32, one thread) is the forward in elements per ns.
The masks come from different random streams, so `check` compares statistics, not values: the
share of zeros and the mean of the output, within 10 standard deviations of their difference.
`saved` is what autograd keeps for backward, in bytes per element (saved_tensors_hooks).
"""

from __future__ import annotations

import math

import torch

import pyfused.nn.functional as PF

from .harness import Cell, Config, Run, Target

P = 0.5
WORKLOADS = {"1Mi": 2**20, "16Mi": 2**24}


def saved_bytes_per_element(fn, numel):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved) / numel


def statistics(y):
    return [torch.stack([(y == 0).double().mean(), y.double().mean()])]


def dropout_cell(cfg: Config, workload: str, numel: int, backward: bool, **options) -> Cell:
    numel = cfg.shapes([(numel,)])[0][0]
    with_ready_mask = not options.get("one_thread")  # the in-cache case times pyfused's own cost

    def setup():
        x = torch.randn(numel, device=cfg.device, requires_grad=backward)
        grad = torch.randn(numel, device=cfg.device) if backward else None
        functions = {"pyfused": PF.dropout, "torch": torch.nn.functional.dropout}
        if with_ready_mask:
            noise = torch.empty(numel, device=cfg.device).bernoulli_(1 - P).div_(1 - P)
            functions["torch x*mask"] = lambda x, p, training: x * noise

        def factory(impl):
            fn, last = functions[impl], {}

            def call():
                y = last["y"] = fn(x, P, True)
                if backward:
                    y.backward(grad)
                    x.grad = None

            return Run(call, outputs=lambda: statistics(last["y"].detach()),
                       extra=lambda: {"saved_bytes_per_element": saved_bytes_per_element(lambda: fn(x, P, True), numel)})

        return {impl: (lambda impl=impl: factory(impl)) for impl in functions}

    op = "dropout fwd+bwd" if backward else "dropout fwd"
    table = f"dropout p={P}, fp32, " + ("forward + backward" if backward else "forward")
    per_element = {"pyfused": 16 if backward else 8, "torch": 16 if backward else 8, "torch x*mask": 24 if backward else 12}
    return Cell("dropout", table, op, workload, f"{numel:,} fp32", 1, numel,
                {impl: size * numel for impl, size in per_element.items()}, setup,
                ours="pyfused", tol=(0.0, 10 * math.sqrt(2 / numel)), show={"saved B/el": "saved_bytes_per_element"},
                **options)


def dropout_add_cell(cfg: Config, workload: str, numel: int, dtype: torch.dtype) -> Cell:
    numel = cfg.shapes([(numel,)])[0][0]
    width = min(numel, 1024)
    size = torch.finfo(dtype).bits // 8

    def torch_dropout_add(x, residual, bias):
        return residual + torch.nn.functional.dropout(x + bias, P, True)

    def pyfused_dropout_add(x, residual, bias):
        return PF.dropout_add(x, residual, P, True, bias=bias)

    functions = {"pyfused": pyfused_dropout_add, "torch": torch_dropout_add}

    def setup():
        x = torch.randn(numel // width, width, device=cfg.device, dtype=dtype, requires_grad=True)
        residual = torch.randn(numel // width, width, device=cfg.device, dtype=dtype, requires_grad=True)
        bias = torch.zeros(width, device=cfg.device, dtype=dtype)
        grad = torch.randn_like(x)

        def factory(impl):
            fn, last = functions[impl], {}

            def call():
                out = fn(x, residual, bias)
                out.backward(grad)
                last["out"] = out.detach() - residual.detach()  # the dropout part
                x.grad = residual.grad = None

            return Run(call, outputs=lambda: statistics(last["out"]),
                       extra=lambda: {"saved_bytes_per_element": saved_bytes_per_element(lambda: fn(x, residual, bias), numel)})

        return {impl: (lambda impl=impl: factory(impl)) for impl in functions}

    name = str(dtype).removeprefix("torch.")
    return Cell("dropout", "residual + dropout(x + bias), forward + backward", "dropout_add fwd+bwd",
                f"{workload}-{name}", f"{numel:,} {name}", 1, numel, 20 * size // 4 * numel, setup,
                tol=(0.0, 10 * math.sqrt(2 / numel)), show={"saved B/el": "saved_bytes_per_element"})


def cells(cfg: Config) -> list[Cell]:
    out = [dropout_cell(cfg, w, n, backward) for backward in (False, True) for w, n in WORKLOADS.items()]
    out += [dropout_add_cell(cfg, "16Mi", WORKLOADS["16Mi"], dtype) for dtype in (torch.float32, torch.bfloat16)]
    if cfg.cpu:
        out.append(dropout_cell(cfg, "cache-1t", 2**15, False, one_thread=True, repeat=20))
    return out


TARGETS = [
    Target("issue 7", "cpu", "dropout fwd+bwd", "16Mi", "speedup", 10.0, ("torch",)),
    Target("issue 7", "cpu", "dropout fwd", "16Mi", "share", 0.70),
    Target("issue 7", "cpu", "dropout_add fwd+bwd", "16Mi-float32", "speedup", 3.0, ("torch",)),
    Target("issue 7", "cuda", "dropout fwd", "16Mi", "share", 0.85),
]
