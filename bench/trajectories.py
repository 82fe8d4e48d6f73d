"""The lecture picture: the paths of pyfused's optimizers on 2-D test functions, one PNG (untimed).

Each optimizer minimizes each function from the same start, on one float64 param of two values,
through pyfused.optim (the C++ kernels; gradients from autograd). Learning rates are per function:
one for the plain gradient methods, one for the adaptive ones, picked so that the paths stay in the
frame and differ from each other.
"""

from __future__ import annotations

from pathlib import Path

import torch

import pyfused

from .harness import Config
from .plots import pyplot


def rosenbrock(x, y):
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def beale(x, y):
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def saddle(x, y):
    return x**2 - y**2


FUNCTIONS = {  # name: (f, start, minimum or None, x range, y range, log-spaced contours, (lr plain, lr adaptive))
    "Rosenbrock": (rosenbrock, (-1.5, 2.0), (1.0, 1.0), (-2.0, 2.0), (-1.0, 3.0), True, (1e-3, 0.05)),
    "Beale": (beale, (1.0, 1.5), (3.0, 0.5), (-1.0, 4.0), (-1.5, 2.0), True, (3e-3, 0.05)),
    "saddle x^2 - y^2": (saddle, (-1.0, 1e-3), None, (-1.5, 1.5), (-1.5, 1.5), False, (2e-2, 0.02)),
}
OPTIMIZERS = {  # label: (pyfused.optim class, hyperparameters (an lr here overrides the function's), adaptive)
    "SGD": ("SGD", {}, False),
    "momentum": ("SGD", {"momentum": 0.9}, False),
    "Nesterov": ("SGD", {"momentum": 0.9, "nesterov": True}, False),
    "Adagrad": ("Adagrad", {}, True),
    "RMSprop": ("RMSprop", {}, True),
    "Adam": ("Adam", {}, True),
    "AdamW": ("AdamW", {"weight_decay": 0.1}, True),
    "Adadelta": ("Adadelta", {"lr": 1.0}, True),  # torch's default lr: its steps are rescaled by its own history
}


def path(f, start, name, hyper, lr, steps) -> list[tuple[float, float]]:
    p = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    opt = getattr(pyfused.optim, name)([p], **{"lr": lr, **hyper})
    out = [start]
    for _ in range(steps):
        opt.zero_grad()
        f(p[0], p[1]).backward()
        opt.step()
        out.append(tuple(p.tolist()))
    return out


def after(cfg: Config, rows: list[dict], out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    steps = 40 if cfg.mode == "tiny" else 300
    fig, axes = plt.subplots(1, len(FUNCTIONS), figsize=(6 * len(FUNCTIONS), 5.2), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, (title, (f, start, best, xs, ys, log, lrs)) in zip(axes[0], FUNCTIONS.items()):
        gx, gy = torch.meshgrid(torch.linspace(*xs, 300), torch.linspace(*ys, 300), indexing="xy")
        z = f(gx, gy)
        if log:
            ax.contour(gx, gy, torch.log10(z + 1e-3), levels=20, cmap="Greys", linewidths=0.6)
        else:
            ax.contour(gx, gy, z, levels=20, cmap="Greys", linewidths=0.6)
        for color, (label, (name, hyper, adaptive)) in zip(colors, OPTIMIZERS.items()):
            lr = hyper.get("lr", lrs[adaptive])
            xy = path(f, start, name, hyper, lr, steps)
            ax.plot([a for a, _ in xy], [b for _, b in xy], "-", color=color, lw=1.3, label=f"{label} (lr {lr:g})")
        ax.plot(*start, "ko", ms=5)
        if best is not None:
            ax.plot(*best, "k*", ms=12)
        ax.set_xlim(*xs)
        ax.set_ylim(*ys)
        ax.set_title(f"{title}, {steps} steps from {start}", fontsize=10)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("pyfused.optim on 2-D test functions (o start, * minimum)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "trajectories.png", dpi=72)
    plt.close(fig)
    return [out / "trajectories.png"]
