"""End to end: a small CNN (BatchNorm, Dropout) and an MLP (Dropout) trained on synthetic data, with
torch's components and with pyfused's (PYFUSED below), the same steps on the same batches.

One timed call is one training step: forward, cross-entropy, backward, clipping (MLP), optimizer
step. Every path starts from the same weights, takes the same number of steps (the harness gives
every path the same calls) on the same batches, and calls torch.manual_seed(step) first. Rows carry
the time per step, the share of it spent in clipping + optimizer step (timed inside the step,
synchronized on CUDA), and the loss curve. after() draws the curves.

Three paths, because pyfused's dropout masks come from another random stream than torch's
(Philox-4x32-10 keyed by one seed per call, not torch's bernoulli_), so the two libraries never
drop the same elements for the same seed:
- "pyfused": pyfused's BatchNorm2d, Dropout, optimizer and clip_grad_norm_;
- "torch-philox", the reference the check compares with: torch's BatchNorm2d, optimizer and
  clipping, and PhiloxDropout, torch ops (x * mask * scale) whose mask is the test suite's
  independent numpy Philox (pyfused.check.dropout_cases) for the seed pyfused's Dropout draws from
  the same generator. Both paths then drop the same elements, and their loss curves coincide to
  rounding: `check` holds them within LOSS_RTOL at every step. Its time includes making the mask
  in numpy, so it is no speed baseline;
- "torch": torch's own components, Dropout included: the speed baseline. Its masks differ, so its
  curve agrees with the others only statistically; it is drawn and its gap shown, not checked.
The alternative, a statistical tolerance from two torch runs with different seeds, would hold the
curves only to the spread that other masks cause (pyfused against torch's own masks: up to 0.6%
for the CNN and 11% for the MLP over the quick run's 32 steps here), far looser than this check.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

import pyfused
import pyfused.nn.utils
from pyfused.check import dropout_cases

from .harness import Cell, Config, Run, synchronize
from .plots import pyplot

# torch component -> pyfused's drop-in: the "pyfused" path builds its model and optimizer through it
PYFUSED = {
    torch.optim.SGD: pyfused.optim.SGD,
    torch.optim.AdamW: pyfused.optim.AdamW,
    torch.nn.utils.clip_grad_norm_: pyfused.nn.utils.clip_grad_norm_,
    torch.nn.BatchNorm2d: pyfused.nn.BatchNorm2d,
    torch.nn.Dropout: pyfused.nn.Dropout,
}
# pyfused's losses against torch-philox's may differ by this, relative, at every step. Same masks,
# so what is left is rounding: the optimizers round like torch's for-loop up to the last bit (FMA
# contraction aside) and batch norm differs from torch's fp32 by a few ulps. Training amplifies
# such differences: measured on this machine, the CNN's gap is ~1e-6 up to step 30, then grows
# e-fold every ~8 steps (5e-5 at step 50, 1.2e-4 at 60, 1.4e-3 at 80; the MLP's 2e-5 at 120), so
# a cell runs a fixed number of steps: ROUNDS[mode] rounds of 1 + 5 calls, 32 or 50 steps in all.
LOSS_RTOL = 1e-3
ROUNDS = {"quick": 5, "full": 8}  # tiny: the harness's single round


class PhiloxDropout(nn.Dropout):
    """torch's Dropout in torch ops, with pyfused's mask from the reference Philox: one int64 seed
    drawn from the default generator of the input's device, as pyfused's Dropout draws it."""

    def forward(self, input):
        if not self.training or self.p == 0:
            return input
        seed = torch.empty(1, dtype=torch.int64, device=input.device).random_().item()
        return dropout_cases.expected(input, self.p, seed)


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

    def run(self, checked=True) -> Run:
        return Run(self, outputs=(lambda: [torch.stack(self.losses).double()]) if checked else None,
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

        def factory(swap, checked=True):
            def make():
                model = build(swap).to(cfg.device)
                model.load_state_dict(reference.state_dict())
                return Trainer(model, swap(optimizer)(model.parameters(), **hyper),
                               swap(torch.nn.utils.clip_grad_norm_) if max_norm else None, max_norm, batches,
                               cfg.device).run(checked)
            return make

        # The first path is the one timed against the others, the second the check's reference.
        return {"pyfused": factory(lambda c: PYFUSED.get(c, c)),
                "torch-philox": factory(lambda c: PhiloxDropout if c is nn.Dropout else c),
                "torch": factory(lambda c: c, checked=False)}

    numel = sum(p.numel() for p in build(lambda c: c).parameters())
    return Cell("e2e", "training step, torch components vs pyfused's", "train", name, desc, 1, numel, 0, setup,
                tol=(LOSS_RTOL, 0.0), rounds=ROUNDS.get(cfg.mode), block=5 if cfg.mode in ROUNDS else None,
                show={"opt%": "optimizer_pct"})


def cells(cfg: Config) -> list[Cell]:
    return [cell(cfg, name) for name in MODELS]


def after(cfg: Config, rows: list[dict], out: Path) -> list[Path]:
    """e2e_loss.png: every path's loss curve per model, and pyfused's largest relative gaps."""
    plt, runs = pyplot(), [r for r in rows if r["family"] == "e2e" and r["status"] == "ok"]
    if plt is None or not runs:
        return []
    models = list(dict.fromkeys(r["workload"] for r in runs))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        curves = {r["impl"]: r["extra"]["losses"] for r in runs if r["workload"] == model}
        for impl, style, label in (("torch", "C7:", "torch (its own dropout masks)"),
                                   ("torch-philox", "k-", "torch, pyfused's masks (reference)"),
                                   ("pyfused", "r--", "pyfused")):
            if impl in curves:
                ax.plot(range(1, len(curves[impl]) + 1), curves[impl], style, label=label)
        ax.set_title(f"{cfg.device.type}: {model}; pyfused vs reference: max relative gap "
                     f"{gap(curves, 'torch-philox'):.1e} (tolerance {LOSS_RTOL:g});\n"
                     f"vs torch's own masks: {gap(curves, 'torch'):.1e} (not checked: other masks)", fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "e2e_loss.png", dpi=90)
    plt.close(fig)
    return [out / "e2e_loss.png"]


def gap(curves: dict, against: str) -> float:
    """pyfused's largest relative difference from another path's losses."""
    return max((abs(a - b) / abs(b) for a, b in zip(curves.get("pyfused", []), curves.get(against, []))),
               default=math.nan)
