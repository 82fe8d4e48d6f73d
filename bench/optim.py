"""Optimizer benchmark: pyfused.optim against torch.optim's for-loop, foreach and fused paths.

    ./dev bench                     # everything, CPU section (+ GPU section when CUDA is present)
    ./dev bench --quick             # a smoke run: few steps
    ./dev bench --optimizers adam,adamw --workloads large --device cpu

For every (device, workload, optimizer) the implementations are timed side by side, interleaved in
round-robin blocks together with the bandwidth probes (see bench/harness.py), so the ratios and
the bandwidth shares come from one run under the same machine conditions. What each row counts:

- ms/step: median (p20, p80) of `opt.step()` wall time; grads are assigned once and persist.
- GB/s: bytes moved per step / median time, counting only the compulsory traffic of one pass:
  Adam, AdamW: read param, grad, exp_avg, exp_avg_sq + write param, exp_avg, exp_avg_sq = 28 B/elem;
  SGD (momentum): read param, grad, momentum_buffer + write param, momentum_buffer = 20 B/elem;
  Adagrad: read param, grad, sum + write param, sum = 20 B/elem;
  RMSprop: read param, grad, square_avg + write param, square_avg = 20 B/elem (fp32: 4 B a value).
  Workloads that fit in a large last-level cache can exceed the DRAM figures.
- %copy, %in-place: GB/s as a share of the copy (2 accesses/elem) and in-place `a += s*b`
  (3 accesses/elem) bandwidths measured in the same run. An in-place update can exceed 100% of
  copy: a copy also pays a write-allocate read that is not counted.
- pyfused speedup (on torch rows): that row's median time / pyfused's median time.
- host row: 2,000 one-element tensors, so the step is pure per-call and per-tensor host work;
  reported as µs per tensor per step (step time / 2,000).

After timing, every implementation has run the same steps on the same grads from the same
initial params; the bench checks that their params agree (a fast result that computed something
else would show up as "MISMATCH").

The targets of issue 2 (CPU) and issue 3 (GPU) are checked at the end: PASS/FAIL with the ratio.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import pyfused  # noqa: E402


# ----------------------------------------------------------------------------------------------
# What is measured


@dataclass(frozen=True)
class OptimizerSpec:
    name: str  # class name in torch.optim and pyfused.optim
    kwargs: dict
    bytes_per_element: int
    counted: str  # what the bytes count


OPTIMIZERS = {
    "sgd": OptimizerSpec("SGD", {"lr": 1e-3, "momentum": 0.9}, 20,
                         "read param, grad, momentum_buffer; write param, momentum_buffer"),
    "adagrad": OptimizerSpec("Adagrad", {}, 20, "read param, grad, sum; write param, sum"),
    "rmsprop": OptimizerSpec("RMSprop", {}, 20, "read param, grad, square_avg; write param, square_avg"),
    "adam": OptimizerSpec("Adam", {}, 28,
                          "read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq"),
    "adamw": OptimizerSpec("AdamW", {}, 28,
                           "read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq"),
}

IMPLS = ("pyfused", "torch-forloop", "torch-foreach", "torch-fused")
HOST_IMPLS = ("pyfused", "torch-foreach", "torch-fused")  # the for-loop adds nothing here


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """The parameters of GPT-2 small (124,439,808 values; the LM head is tied to wte)."""
    d, vocab, ctx, layers = 768, 50257, 1024, 12
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,)]  # ln_1 weight, bias
        shapes += [(d, 3 * d), (3 * d,)]  # attn.c_attn
        shapes += [(d, d), (d,)]  # attn.c_proj
        shapes += [(d,), (d,)]  # ln_2 weight, bias
        shapes += [(d, 4 * d), (4 * d,)]  # mlp.c_fc
        shapes += [(4 * d, d), (d,)]  # mlp.c_proj
    shapes += [(d,), (d,)]  # ln_f
    return shapes


WORKLOADS = {
    "large": ("150 x 65,536", [(65536,)] * 150),
    "small": ("2,000 x 1,024", [(1024,)] * 2000),
    "mixed": ("2 x 4Mi + 500 x 1,024 + 500 x 64", [(4 * 2**20,)] * 2 + [(1024,)] * 500 + [(64,)] * 500),
    "gpt2": ("GPT-2 small, 148 tensors, 124M", gpt2_small_shapes()),
    "host": ("2,000 x 1 (host overhead)", [(1,)] * 2000),
}
DEFAULT_WORKLOADS = {"cpu": ["large", "small", "mixed", "host"], "cuda": ["large", "small", "mixed", "gpt2", "host"]}


@dataclass(frozen=True)
class Target:
    device: str
    workload: str
    optimizers: tuple[str, ...]
    kind: str  # "speedup" (pyfused vs baseline), "us_per_tensor" (<=), "share_copy" (>=)
    baseline: str | None
    threshold: float
    note: str = ""


ALL = tuple(OPTIMIZERS)
NOISY_LOAD = harness.NOISY_LOAD
BANDWIDTH_DIP = 0.75  # a cell whose own copy probe falls below this share of the run's is flagged too
TARGETS = [
    # issue 2, CPU (2 cores)
    Target("cpu", "large", ("adam", "adamw", "sgd", "adagrad"), "speedup", "torch-fused", 1.2),
    Target("cpu", "large", ("rmsprop",), "speedup", "torch-foreach", 3.0),
    Target("cpu", "small", ALL, "speedup", "torch-fused", 8.0),
    Target("cpu", "mixed", ALL, "speedup", "torch-fused", 2.0),
    Target("cpu", "host", ALL, "us_per_tensor", None, 1.0),
    # issue 3, GPU
    Target("cuda", "large", ALL, "share_copy", None, 0.85),
    Target("cuda", "small", ALL, "speedup", "torch-fused", 1.0),
    *[Target("cuda", w, ALL, "speedup", "torch-foreach", 3.0) for w in ("large", "small", "mixed", "gpt2")],
]


def has_fused(spec: OptimizerSpec) -> bool:
    return "fused" in inspect.signature(getattr(torch.optim, spec.name).__init__).parameters


# ----------------------------------------------------------------------------------------------
# Running


@dataclass
class Result:
    device: str
    workload: str
    optimizer: str
    impl: str
    n_tensors: int
    numel: int
    bytes_per_step: int
    stats: harness.Stats | None = None
    error: str | None = None
    max_abs_diff: float | None = None  # vs the reference implementation's params
    matches: bool | None = None
    copy_gbps: float = math.nan  # filled in once the whole run's probe samples are pooled
    inplace_gbps: float = math.nan
    local_copy_gbps: float = math.nan  # this cell's own probe samples
    local_inplace_gbps: float = math.nan
    foreign_load: float = math.nan  # other processes' share of the CPUs while this cell ran
    planned_samples: int = 0  # the fewest samples a cell should have; fewer means it hit its time cap

    @property
    def ok(self) -> bool:
        return self.stats is not None and self.stats.n > 0

    @property
    def ms(self) -> float:
        return self.stats.p50 * 1e3 if self.ok else math.nan

    @property
    def gbps(self) -> float:
        return self.bytes_per_step / self.stats.p50 / 1e9 if self.ok else math.nan

    @property
    def us_per_tensor(self) -> float:
        return self.stats.p50 * 1e6 / self.n_tensors if self.ok else math.nan


def build(impl: str, spec: OptimizerSpec, params: list[torch.Tensor], grads: list[torch.Tensor]):
    """A step function for one implementation on its own copy of the params (grads are shared,
    they are only read). Raises if the implementation does not run here."""
    own = [p.detach().clone().requires_grad_(True) for p in params]
    for p, g in zip(own, grads):
        p.grad = g
    kwargs = dict(spec.kwargs)
    if impl == "pyfused":
        opt = getattr(pyfused.optim, spec.name)(own, **kwargs)
    else:
        if impl == "torch-fused":
            if not has_fused(spec):
                raise NotImplementedError(f"torch.optim.{spec.name} has no fused implementation")
            kwargs["fused"] = True
        else:
            kwargs["foreach"] = impl == "torch-foreach"
        opt = getattr(torch.optim, spec.name)(own, **kwargs)
    opt.step()  # raises here if this implementation does not support the device
    return opt.step, own


def short_error(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:110]}"


def run_cell(device, workload, opt_key, probe, rounds, block, budget_s=None, min_samples=20, seed=0):
    spec = OPTIMIZERS[opt_key]
    shapes = WORKLOADS[workload][1]
    impls = HOST_IMPLS if workload == "host" else IMPLS
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=generator).to(device) for s in shapes]
    grads = [(torch.randn(s, generator=generator) * 1e-2).to(device) for s in shapes]
    numel = sum(p.numel() for p in params)
    load = harness.ForeignLoad()
    results, cases, owned, probe_stats = {}, [], {}, {}
    for impl in impls:
        r = Result(device.type, workload, opt_key, impl, len(shapes), numel, numel * spec.bytes_per_element)
        results[impl] = r
        try:
            step, own = build(impl, spec, params, grads)
        except Exception as error:  # noqa: BLE001 - reported in the table, not fatal
            r.error = short_error(error)
            continue
        owned[impl] = own
        cases.append(harness.Case(impl, step))
    del params
    if cases:
        stats = harness.run_interleaved(cases + probe.cases(), rounds=rounds, block=block, device=device,
                                        min_rounds=math.ceil(min_samples / block), budget_s=budget_s,
                                        hard_budget_s=None if budget_s is None else 2 * budget_s)
        probe_stats = {k: stats[k] for k in ("bw:copy", "bw:inplace")}
        local_copy = probe.gbps("copy", stats["bw:copy"])
        local_inplace = probe.gbps("inplace", stats["bw:inplace"])
        for impl in owned:
            results[impl].stats = stats[impl]
            results[impl].local_copy_gbps = local_copy
            results[impl].local_inplace_gbps = local_inplace
            results[impl].planned_samples = min(min_samples, rounds * block)
        # Every implementation ran the same steps on the same grads: their params must agree.
        reference = next((i for i in ("torch-forloop", "torch-foreach", "torch-fused") if i in owned), None)
        if reference is not None:
            harness.synchronize(device)
            for impl, own in owned.items():
                diff, bad = 0.0, False
                for a, b in zip(own, owned[reference]):
                    if a.numel():
                        diff = max(diff, (a.detach() - b.detach()).abs().max().item())
                        bad = bad or not torch.allclose(a.detach(), b.detach(), rtol=1e-4, atol=1e-5)
                results[impl].max_abs_diff = diff
                results[impl].matches = not bad
    busy = load.share()
    for r in results.values():
        r.foreign_load = busy
    del owned, cases, grads
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return results, probe_stats


# ----------------------------------------------------------------------------------------------
# Reporting


def speedup(results, device, workload, opt_key, baseline) -> float:
    mine = results.get((device, workload, opt_key, "pyfused"))
    other = results.get((device, workload, opt_key, baseline))
    if mine is None or other is None or not (mine.ok and other.ok):
        return math.nan
    return other.stats.p50 / mine.stats.p50


def step_table(results, device) -> str:
    headers = ["workload", "optimizer", "impl", "ms/step", "p20", "p80", "GB/s", "%copy", "%in-place",
               "pyfused speedup", "params"]
    rows = []
    for (dev, workload, opt_key, impl), r in results.items():
        if dev != device or workload == "host":
            continue
        if not r.ok:
            rows.append([workload, OPTIMIZERS[opt_key].name, impl, None, None, None, None, None, None, "n/a", None])
            continue
        ratio = None if impl == "pyfused" else f"{speedup(results, dev, workload, opt_key, impl):.2f}x"
        rows.append([
            workload, OPTIMIZERS[opt_key].name, impl, r.ms, r.stats.p20 * 1e3, r.stats.p80 * 1e3, r.gbps,
            f"{100 * r.gbps / r.copy_gbps:.0f}%", f"{100 * r.gbps / r.inplace_gbps:.0f}%", ratio,
            _match(r),
        ])
    return harness.table(headers, rows, align="lllrrrrrrrl") + _not_run(results, device, False) if rows else ""


def host_table(results, device) -> str:
    headers = ["optimizer", "impl", "ms/step", "p20", "p80", "us/tensor/step", "pyfused speedup", "params"]
    rows = []
    for (dev, workload, opt_key, impl), r in results.items():
        if dev != device or workload != "host":
            continue
        if not r.ok:
            rows.append([OPTIMIZERS[opt_key].name, impl, None, None, None, None, "n/a", None])
            continue
        ratio = None if impl == "pyfused" else f"{speedup(results, dev, workload, opt_key, impl):.2f}x"
        rows.append([OPTIMIZERS[opt_key].name, impl, r.ms, r.stats.p20 * 1e3, r.stats.p80 * 1e3,
                     r.us_per_tensor, ratio, _match(r)])
    return harness.table(headers, rows, align="llrrrrrl") + _not_run(results, device, True) if rows else ""


def wide_table(results, device, host=False) -> str:
    """One row per (workload, optimizer), the implementations side by side."""
    impls = HOST_IMPLS if host else IMPLS
    cells = list(dict.fromkeys((w, o) for (d, w, o, _i) in results if d == device and (w == "host") == host))
    if not cells:
        return ""
    headers, groups = (["optimizer"], [("", 1)]) if host else (["workload", "optimizer"], [("", 2)])
    for impl in impls:
        cols = ["ms", "us/t"] if host else ["ms", "GB/s", "%cp", "%ip"]
        if impl != "pyfused":
            cols.append("x")
        headers += cols
        groups.append((f" {impl} ", len(cols)))
    headers += ["noise", "load", "check"]
    groups.append(("", 3))
    rows = []
    for workload, opt_key in cells:
        row = [] if host else [workload]
        row.append(OPTIMIZERS[opt_key].name)
        spreads, checks, load = [], [], math.nan
        for impl in impls:
            r = results.get((device, workload, opt_key, impl))
            ok = r is not None and r.ok
            if ok:
                spreads.append(r.stats.spread)
                checks.append(r.matches)
                load = r.foreign_load
            if host:
                row += [r.ms, r.us_per_tensor] if ok else ["n/a", None]
            else:
                row += ([r.ms, r.gbps, round(100 * r.gbps / r.copy_gbps), round(100 * r.gbps / r.inplace_gbps)]
                        if ok else ["n/a", None, None, None])
            if impl != "pyfused":
                row.append(f"{speedup(results, device, workload, opt_key, impl):.2f}x" if ok else None)
        row += [f"{100 * max(spreads):.0f}%" if spreads else None, f"{100 * load:.0f}%" if math.isfinite(load) else None,
                "MISMATCH" if False in checks else ("ok" if True in checks else None)]
        rows.append(row)
    align = ("l" if host else "ll") + "r" * (len(headers) - (1 if host else 2) - 1) + "l"
    return harness.table(headers, rows, align=align, sep=" ", groups=groups) + _not_run(results, device, host)


def _not_run(results, device, host) -> str:
    """One line per distinct reason an implementation was not measured."""
    reasons = {}
    for (dev, workload, opt_key, impl), r in results.items():
        if dev == device and (workload == "host") == host and not r.ok:
            reasons.setdefault(f"{impl} {OPTIMIZERS[opt_key].name}: {r.error}", []).append(workload)
    return "".join(f"\n  n/a: {why} ({', '.join(dict.fromkeys(w))})" for why, w in reasons.items())


def _match(r: Result) -> str | None:
    if r.matches is None:
        return None
    return "ok" if r.matches else f"MISMATCH {r.max_abs_diff:.1e}"


def check_targets(results, devices, optimizers, workloads):
    """One dict per (target, optimizer) this run can speak to: label, measured, need, status, note."""
    out = []
    for t in TARGETS:
        if t.device not in devices or t.workload not in workloads.get(t.device, ()):
            continue
        for opt_key in t.optimizers:
            if opt_key not in optimizers:
                continue
            name = OPTIMIZERS[opt_key].name
            mine = results.get((t.device, t.workload, opt_key, "pyfused"))
            if t.kind == "speedup":
                baseline, note = t.baseline, t.note
                base = results.get((t.device, t.workload, opt_key, baseline))
                if baseline == "torch-fused" and (base is None or not base.ok):
                    baseline = "torch-foreach"
                    note = f"torch has no fused {name}"
                label = f"{t.device} {t.workload:5} {name:7} pyfused vs {baseline}"
                value = speedup(results, t.device, t.workload, opt_key, baseline)
                measured, need = f"{value:.2f}x", f">= {t.threshold:.2f}x"
                passed = value >= t.threshold
            elif t.kind == "us_per_tensor":
                label, note = f"{t.device} {t.workload:5} {name:7} pyfused host cost", t.note
                value = mine.us_per_tensor if mine is not None else math.nan
                measured, need = f"{value:.2f} us/tensor", f"<= {t.threshold:.2f} us"
                passed = value <= t.threshold
            else:  # share_copy
                label, note = f"{t.device} {t.workload:5} {name:7} pyfused share of copy", t.note
                value = mine.gbps / mine.copy_gbps if mine is not None and mine.ok else math.nan
                measured, need = f"{100 * value:.0f}% of copy", f">= {100 * t.threshold:.0f}%"
                passed = value >= t.threshold
            if not math.isfinite(value):
                why = mine.error if mine is not None and mine.error else "not measured"
                status, measured = "N/A", f"({why})"
            else:
                status = "PASS" if passed else "FAIL"
            note = "; ".join(x for x in [note, *noise_flags(mine)] if x)
            out.append({"target": label, "measured": measured, "need": need, "status": status, "note": note,
                        "value": value, "threshold": t.threshold, "device": t.device, "workload": t.workload,
                        "optimizer": opt_key, "check": t.kind, "baseline": t.baseline})
    return out


def noise_flags(r: Result | None) -> list[str]:
    """Why a cell's figures may not be representative: other processes on our CPUs, or a memory
    bandwidth dip (e.g. a neighbour on the same host) seen by the probes that ran with the cell."""
    if r is None:
        return []
    flags = []
    if r.foreign_load > NOISY_LOAD:
        flags.append(f"load {100 * r.foreign_load:.0f}%")
    if r.ok and r.stats.n < r.planned_samples:
        flags.append(f"{r.stats.n} samples (time cap)")
    if r.local_copy_gbps < BANDWIDTH_DIP * r.copy_gbps:
        flags.append(f"copy bw {r.local_copy_gbps:.0f} of {r.copy_gbps:.0f} GB/s")
    return [f"UNRELIABLE: {', '.join(flags)}"] if flags else []


def plot(results, probes, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib to get one)")
        return
    devices = sorted({r.device for r in results.values()})
    panels = {d: [w for w in WORKLOADS if w != "host" and any(r.device == d and r.workload == w for r in results.values())]
              for d in devices}
    columns = max((len(p) for p in panels.values()), default=0)
    if not columns:
        return
    fig, axes = plt.subplots(len(devices), columns, figsize=(5.2 * columns, 4.2 * len(devices)), squeeze=False)
    colors = {"pyfused": "#d62728", "torch-forloop": "#7f7f7f", "torch-foreach": "#1f77b4", "torch-fused": "#2ca02c"}
    for row, device in enumerate(devices):
        for ax in axes[row][len(panels[device]):]:
            ax.axis("off")
    for ax, (device, workload) in zip([axes[r][c] for r, d in enumerate(devices) for c in range(len(panels[d]))],
                                      [(d, w) for d in devices for w in panels[d]]):
        opts = [k for k in OPTIMIZERS if any((device, workload, k, i) in results for i in IMPLS)]
        width = 0.8 / len(IMPLS)
        for j, impl in enumerate(IMPLS):
            values = [results[(device, workload, k, impl)].gbps if (device, workload, k, impl) in results else 0
                      for k in opts]
            values = [v if math.isfinite(v) else 0 for v in values]
            ax.bar([i + (j - (len(IMPLS) - 1) / 2) * width for i in range(len(opts))], values, width,
                   label=impl, color=colors[impl])
        probe = probes[device]
        ax.axhline(probe.gbps("copy"), color="k", ls="--", lw=1, label="copy bandwidth")
        ax.axhline(probe.gbps("inplace"), color="k", ls=":", lw=1, label="in-place a+=s*b bandwidth")
        ax.set_xticks(range(len(opts)), [OPTIMIZERS[k].name for k in opts])
        ax.set_title(f"{device}: {workload} ({WORKLOADS[workload][0]})", fontsize=9)
        ax.set_ylabel("effective GB/s")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


# ----------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS),
                   help=f"comma-separated, from {','.join(OPTIMIZERS)} (default: all)")
    p.add_argument("--workloads", default=None,
                   help=f"comma-separated, from {','.join(WORKLOADS)} (default: large,small,mixed,host "
                        "on CPU; gpt2 as well on CUDA)")
    harness.add_run_options(p, "step", cell_seconds=12.0, retry_until=120.0)
    p.add_argument("--long", action="store_true",
                   help="one table row per implementation, with p20 and p80 (default: implementations side by side)")
    p.add_argument("--strict", action="store_true", help="exit 1 if a target FAILs or pyfused did not run")
    args = p.parse_args(argv)
    args.optimizers = harness.choices(p, "--optimizers", args.optimizers, OPTIMIZERS)
    if args.workloads is not None:
        args.workloads = harness.choices(p, "--workloads", args.workloads, WORKLOADS)
    harness.finish_run_options(args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    devices = harness.selected_devices(args)
    if not devices:
        return 0
    workloads = {d.type: args.workloads or DEFAULT_WORKLOADS[d.type] for d in devices}

    meta = harness.machine_info(devices)
    out = harness.ResultsFile("optim", meta)
    print(harness.describe_machine(meta))
    print(f"timing: up to {args.rounds} rounds x {args.block} timed steps per case, each block after 1 untimed "
          f"step (at least {min(args.rounds, math.ceil(20 / args.block)) * args.block} samples; a cell stops "
          f"adding rounds after {args.cell_seconds:g} s); implementations and bandwidth probes interleaved "
          f"round-robin; median [p20, p80]")
    counted = {}
    for k in args.optimizers:
        counted.setdefault((OPTIMIZERS[k].bytes_per_element, OPTIMIZERS[k].counted), []).append(OPTIMIZERS[k].name)
    print("GB/s counts these bytes per element (fp32, 4 B a value), 1 GB = 1e9 B:")
    for (size, what), names in counted.items():
        print(f"  {', '.join(names)}: {size} B = {what}")
    print(f"results: {out.path}\n")

    results, probes = {}, {}
    started = time.perf_counter()
    run_load = harness.ForeignLoad()
    for device in devices:
        probe = harness.BandwidthProbe(device, mib=args.probe_mib)
        probes[device.type] = probe
        for workload in workloads[device.type]:
            for opt_key in args.optimizers:
                best = None
                for attempt in range(1 + args.retries):
                    t0 = time.perf_counter()
                    cell, probe_stats = run_cell(device, workload, opt_key, probe, args.rounds, args.block,
                                                 args.cell_seconds)
                    measured = [i for i, r in cell.items() if r.ok]
                    busy = next(iter(cell.values())).foreign_load
                    n = min((cell[i].stats.n for i in measured), default=0)
                    print(f"  [{device.type}] {workload}/{OPTIMIZERS[opt_key].name}: {len(measured)} of "
                          f"{len(cell)} implementations x {n} samples, {time.perf_counter() - t0:.1f} s, "
                          f"other processes {100 * busy:.0f}% of the CPUs", flush=True)
                    if best is None or not busy >= best[2]:  # NaN load (no /proc): keep the first
                        best = (cell, probe_stats, busy)
                    if not busy > NOISY_LOAD or time.perf_counter() - started + (time.perf_counter() - t0) > args.retry_until:
                        break
                    print("    measuring this cell again (kept: the attempt with the least foreign load)")
                cell, probe_stats, busy = best
                probe.record(probe_stats, quiet=not busy > NOISY_LOAD)
                for impl, r in cell.items():
                    results[(device.type, workload, opt_key, impl)] = r
        probe.release()

    # Shares use the bandwidth pooled over the whole run, measured side by side with every cell.
    for r in results.values():
        r.copy_gbps = probes[r.device].gbps("copy")
        r.inplace_gbps = probes[r.device].gbps("inplace")
    busy = run_load.share()
    print(f"\nmeasured in {time.perf_counter() - started:.0f} s; other processes took {100 * busy:.0f}% of the "
          f"{meta['cpu_count']} CPUs meanwhile" + (" -- timings competed with them, expect noise" if busy > 0.05 else ""))

    for device in devices:
        dev = device.type
        probe = probes[dev]
        print(f"\n=== {dev.upper()} ===")
        for kind, what in (("copy", "dst.copy_(src), read+write"), ("inplace", "a.add_(b, alpha=s), 2 reads+1 write")):
            stats = probe.copy if kind == "copy" else probe.inplace
            lo, hi = probe.gbps_range(kind)
            print(f"{kind + ' bandwidth:':20} {probe.gbps(kind):6.1f} GB/s  [p80..p20 time: {lo:.1f}..{hi:.1f}]  "
                  f"({what}, 2 x {probe.mib} MiB fp32)")
            out.append({"kind": "bandwidth", "device": dev, "probe": kind, "gbps": probe.gbps(kind),
                        "gbps_p80_time": lo, "gbps_p20_time": hi, "buffer_mib": probe.mib,
                        "bytes_per_call": probe.bytes(kind), "basis": probe.basis, "ms_p50": stats.p50 * 1e3,
                        "ms_p20": stats.p20 * 1e3, "ms_p80": stats.p80 * 1e3, "n_samples": stats.n})
        print(f"{'':20} probes interleaved with every cell; {probe.basis}")
        if args.long:
            text, host_text = step_table(results, dev), host_table(results, dev)
        else:
            text, host_text = wide_table(results, dev), wide_table(results, dev, host=True)
            print("ms = median ms/step; GB/s at the median; %cp, %ip = GB/s as % of the copy and in-place "
                  "bandwidths above;\nx = that torch path's time / pyfused's (pyfused speedup); noise = largest "
                  "(p80-p20)/median of the row;\nload = other processes' CPU share during the row; check = "
                  "params of all paths agree after the run")
        if text:
            print("\n" + text)
        if host_text:
            print(f"\nhost overhead, {WORKLOADS['host'][0]}: us/t = us per tensor per step (step time / 2,000)\n"
                  + host_text)

    for (dev, workload, opt_key, impl), r in results.items():
        row = {"kind": "step", "device": dev, "workload": workload, "workload_desc": WORKLOADS[workload][0],
               "optimizer": OPTIMIZERS[opt_key].name, "impl": impl, "status": "ok" if r.ok else "n/a",
               "error": r.error, "n_tensors": r.n_tensors, "numel": r.numel,
               "bytes_per_element": OPTIMIZERS[opt_key].bytes_per_element, "bytes_per_step": r.bytes_per_step}
        if r.ok:
            row.update({"ms_p50": r.ms, "ms_p20": r.stats.p20 * 1e3, "ms_p80": r.stats.p80 * 1e3,
                        "n_samples": r.stats.n, "gbps": r.gbps, "copy_gbps": r.copy_gbps,
                        "inplace_gbps": r.inplace_gbps, "share_copy": r.gbps / r.copy_gbps,
                        "share_inplace": r.gbps / r.inplace_gbps, "local_copy_gbps": r.local_copy_gbps,
                        "local_inplace_gbps": r.local_inplace_gbps, "us_per_tensor": r.us_per_tensor,
                        "pyfused_speedup": None if impl == "pyfused" else speedup(results, dev, workload, opt_key, impl),
                        "max_abs_diff_vs_reference": r.max_abs_diff, "params_match": r.matches,
                        "rounds": args.rounds, "block": args.block, "foreign_cpu_share": r.foreign_load})
        out.append(row)

    targets = check_targets(results, [d.type for d in devices], args.optimizers, workloads)
    if targets:
        print("\ntargets (issue 2: CPU; issue 3: GPU):")
        print(harness.table(["target", "measured", "need", "result", "note"],
                            [[t["target"], t["measured"], t["need"], t["status"], t["note"]] for t in targets],
                            align="lllll"))
        counts = {s: sum(t["status"] == s for t in targets) for s in ("PASS", "FAIL", "N/A")}
        print(" ".join(f"{n} {s}" for s, n in counts.items() if n))
        for t in targets:
            out.append({"kind": "target", **t})

    mismatches = [r for r in results.values() if r.matches is False]
    for r in mismatches:
        print(f"WARNING: {r.device} {r.workload} {OPTIMIZERS[r.optimizer].name} {r.impl}: params differ "
              f"from the reference by up to {r.max_abs_diff:.2e}")
    if not args.no_plot:
        plot(results, probes, out.stem.with_suffix(".png"))
    print(f"rows: {out.path}")

    broken = [r for r in results.values() if r.impl == "pyfused" and not r.ok]
    if args.strict and (broken or mismatches or any(t["status"] == "FAIL" for t in targets)):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
