"""End to end: a small CNN (BatchNorm, Dropout) and an MLP trained on synthetic data, once with torch's
components and once with pyfused's (PYFUSED below), the same steps on the same batches.

One timed call is one training step: forward, cross-entropy, backward, clipping (MLP), optimizer
step. Both paths start from the same weights, take the same number of steps (the harness gives
every path the same calls) on the same batches, and call torch.manual_seed(step) first, so dropout
draws the same masks while torch's Dropout is in use. Rows carry the time per step, the share of
it spent in clipping + optimizer step (timed inside the step, synchronized on CUDA), and the loss
curve; `check` holds the curves within LOSS_RTOL of each other, and after() draws them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

import pyfused
import pyfused.nn.utils

from .harness import Cell, Config, Run, synchronize
from .plots import pyplot

# torch component -> pyfused's drop-in: the "pyfused" path builds its model and optimizer through it
PYFUSED = {
    torch.optim.SGD: pyfused.optim.SGD,
    torch.optim.AdamW: pyfused.optim.AdamW,
    torch.nn.utils.clip_grad_norm_: pyfused.nn.utils.clip_grad_norm_,
    torch.nn.BatchNorm2d: pyfused.nn.BatchNorm2d,
}
# The losses of the two paths may differ by this, relative, at every step: the optimizers round
# like torch's for-loop up to the last bit (FMA contraction aside), and ~1e-7 per-step differences
# grow through training but stay far below it over these few steps. (A pyfused Dropout draws other
# masks than torch's, so once it is in PYFUSED the curves agree only statistically.)
LOSS_RTOL = 1e-3


def cnn(c):
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), c(nn.BatchNorm2d)(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), c(nn.BatchNorm2d)(64), nn.ReLU(),
                         c(nn.Dropout)(0.1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def mlp(c):
    return nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), c(nn.Dropout)(0.1), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 10))


MODELS = {  # name: (builder, batch shape, optimizer, its hyperparameters, clip max_norm or None, what)
    "cnn": (cnn, (32, 3, 16, 16), torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4}, None,
            "2 conv + BatchNorm + Dropout, batch 32 x 3 x 16 x 16, SGD momentum"),
    "mlp": (mlp, (64, 256), torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.01}, 1.0,
            "256-1024-1024-10 + Dropout, batch 64, AdamW, clip_grad_norm_(1.0)"),
}


class Trainer:
    def __init__(self, model, optimizer, clip, max_norm, batches, device):
        self.model, self.clip, self.max_norm, self.batches, self.device = model, clip, max_norm, batches, device
        self.opt = optimizer
        self.losses, self.opt_s, self.step_s = [], 0.0, 0.0

    def __call__(self):
        x, y = self.batches[len(self.losses) % len(self.batches)]
        torch.manual_seed(len(self.losses))
        t0 = time.perf_counter()
        self.opt.zero_grad()
        loss = nn.functional.cross_entropy(self.model(x), y)
        loss.backward()
        synchronize(self.device)
        t1 = time.perf_counter()
        if self.clip is not None:
            self.clip(self.model.parameters(), self.max_norm)
        self.opt.step()
        synchronize(self.device)
        t2 = time.perf_counter()
        self.losses.append(loss.detach())
        self.opt_s, self.step_s = self.opt_s + t2 - t1, self.step_s + t2 - t0

    def run(self) -> Run:
        return Run(self, outputs=lambda: [torch.stack(self.losses).double()],
                   extra=lambda: {"optimizer_pct": 100 * self.opt_s / self.step_s, "steps": len(self.losses),
                                  "losses": [float(v) for v in self.losses]})


def cell(cfg: Config, name: str) -> Cell:
    build, batch, optimizer, hyper, max_norm, desc = MODELS[name]
    if cfg.mode == "tiny":
        batch = (4, *batch[1:])

    def setup():
        generator = torch.Generator().manual_seed(0)
        inputs = [torch.randn(batch, generator=generator) for _ in range(8)]
        teacher = torch.randn(batch[1], 10, generator=generator)  # labels from per-channel means: learnable
        labels = [((x.mean((2, 3)) if x.dim() == 4 else x) @ teacher).argmax(1) for x in inputs]
        batches = [(x.to(cfg.device), y.to(cfg.device)) for x, y in zip(inputs, labels)]
        torch.manual_seed(0)
        reference = build(lambda module: module).to(cfg.device)

        def factory(swap):
            def make():
                model = build(swap).to(cfg.device)
                model.load_state_dict(reference.state_dict())
                return Trainer(model, swap(optimizer)(model.parameters(), **hyper),
                               swap(torch.nn.utils.clip_grad_norm_) if max_norm else None, max_norm, batches,
                               cfg.device).run()
            return make

        return {"pyfused": factory(lambda c: PYFUSED.get(c, c)), "torch": factory(lambda c: c)}

    numel = sum(p.numel() for p in build(lambda c: c).parameters())
    return Cell("e2e", "training step, torch components vs pyfused's", "train", name, desc, 1, numel, 0, setup,
                tol=(LOSS_RTOL, 0.0), rounds=5 if cfg.mode == "quick" else None, block=5 if cfg.mode == "quick" else None,
                show={"opt%": "optimizer_pct"})


def cells(cfg: Config) -> list[Cell]:
    return [cell(cfg, name) for name in MODELS]


def after(cfg: Config, rows: list[dict], out: Path) -> list[Path]:
    """e2e_loss.png: both paths' loss curves per model, and the largest relative gap."""
    plt, runs = pyplot(), [r for r in rows if r["family"] == "e2e" and r["status"] == "ok"]
    if plt is None or not runs:
        return []
    models = list(dict.fromkeys(r["workload"] for r in runs))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        curves = {r["impl"]: r["extra"]["losses"] for r in runs if r["workload"] == model}
        for impl, style in (("torch", "k-"), ("pyfused", "r--")):
            if impl in curves:
                ax.plot(range(1, len(curves[impl]) + 1), curves[impl], style, label=impl)
        gap = max((abs(a - b) / abs(b) for a, b in zip(curves.get("pyfused", []), curves.get("torch", []))),
                  default=math.nan)
        ax.set_title(f"{cfg.device.type}: {model}, max relative gap {gap:.1e} (tolerance {LOSS_RTOL:g})", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "e2e_loss.png", dpi=90)
    plt.close(fig)
    return [out / "e2e_loss.png"]
