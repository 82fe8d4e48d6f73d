"""Clipping benchmark: pyfused.nn.utils' global norm and fused clip + AdamW step against torch.

    ./dev bench clip                   # CPU section (+ GPU section when CUDA is present)
    ./dev bench clip --quick           # a smoke run: few calls
    ./dev bench clip --workloads large --device cpu

Two sections, each per (device, workload), with the paths timed side by side in round-robin blocks
together with the bandwidth probes (see bench/harness.py), so ratios and bandwidth shares come
from the same minutes of machine time:

- norm alone (fp32 grads, p = 2): pyfused.nn.utils.get_total_norm(grads, 2.0) against
  torch.nn.utils.get_total_norm(grads, 2.0, foreach=True) and foreach=False (torch's for-loop of
  linalg.vector_norm). GB/s counts one read of the grads, 4 B/element.
- clip + AdamW step: clip_grad_norm_ then step(), three paths:
    pyfused fused:   pyfused.nn.utils.clip_grad_norm_(params, max_norm, optimizer=opt) and
                     pyfused.optim.AdamW.step(): the coefficient is applied inside the AdamW kernel;
                     32 B/element = norm read 4 + AdamW 28;
    pyfused unfused: pyfused.nn.utils.clip_grad_norm_(params, max_norm) (the grads are scaled in
                     place) and pyfused.optim.AdamW.step(); 40 B/element, as torch;
    torch:           torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True) and
                     torch.optim.AdamW(fused=True).step(); 40 B/element = norm read 4 + scale
                     read+write 8 + AdamW 28 (read param, grad, exp_avg, exp_avg_sq; write param,
                     exp_avg, exp_avg_sq).

Clipping is active at every step, with no restore pass. Each path's k-th call (k = 0, 1, ...,
the untimed calls included) clips with max_norm_k = 0.5 * |g0| * 0.99**k, where |g0| is the norm
of the initial grads. The in-place paths (torch, pyfused unfused) shrink their grads to norm
max_norm_k, so their next coefficient is 0.99; the fused path's grads stay g0, so its coefficient
is 0.5 * 0.99**k. Either way every path feeds AdamW the same clipped grads, g0 * max_norm_k / |g0|,
at every step, so their params must agree after the run (column "check"); the largest coefficient
seen is reported (column "coef", < 1: clipping was active). The grads shrink by 0.99 a call,
about 0.3x over a default run: finite, far from denormals, and the cost does not depend on values.

Read bandwidth: two probes over a 256 MiB fp32 buffer, on torch's threads: x.sum() (ATen's
parallel reduction) and torch.dot(x, x) (BLAS; the sum of squares, i.e. a 2-norm's arithmetic),
each counted as one read, 4 B/element. The read bandwidth the norm is held to is the faster of the
two medians. (torch.linalg.vector_norm is not used: on one CPU tensor it runs on one thread here.)

The targets of issue 4 (CPU) are checked at the end: PASS/FAIL with the measured figures.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import pyfused  # noqa: E402
import pyfused.nn.utils  # noqa: E402
import pyfused.optim  # noqa: E402


# ----------------------------------------------------------------------------------------------
# What is measured

WORKLOADS = {
    "large": ("150 x 65,536", [(65536,)] * 150),
    "small": ("2,000 x 1,024", [(1024,)] * 2000),
}

NORM_IMPLS = ("pyfused", "torch-foreach", "torch-forloop")
NORM_BYTES = 4  # one read of each fp32 grad

STEP_IMPLS = ("pyfused-fused", "pyfused-unfused", "torch")
STEP_BYTES = {"pyfused-fused": 32, "pyfused-unfused": 40, "torch": 40}
STEP_LABELS = {
    "pyfused-fused": "pyfused clip(optimizer=) + AdamW",
    "pyfused-unfused": "pyfused clip + AdamW",
    "torch": "torch clip(foreach) + AdamW(fused)",
}
STEP_COUNTED = {
    "pyfused-fused": "norm read 4 + AdamW 28 (the coefficient is applied in the AdamW kernel)",
    "pyfused-unfused": "norm read 4 + scale read+write 8 + AdamW 28",
    "torch": "norm read 4 + scale read+write 8 + AdamW 28",
}
ADAMW_COUNTED = "AdamW 28 = read param, grad, exp_avg, exp_avg_sq + write param, exp_avg, exp_avg_sq"

CLIP_START = 0.5  # max_norm of the first call, as a share of the initial grads' norm
CLIP_DECAY = 0.99  # max_norm shrinks by this each call: clipping stays active on the in-place paths

NOISY_LOAD = harness.NOISY_LOAD
BANDWIDTH_DIP = 0.75  # a cell whose own copy probe falls below this share of the run's is flagged too


@dataclass(frozen=True)
class Target:
    device: str
    workload: str
    section: str  # "norm" or "step"
    kind: str  # "share_read" (pyfused GB/s / read GB/s >=) or "speedup" (baseline time / pyfused's >=)
    impl: str
    baseline: str | None
    threshold: float


TARGETS = [  # issue 4, CPU (2 cores)
    Target("cpu", "large", "norm", "share_read", "pyfused", None, 0.90),
    Target("cpu", "large", "step", "speedup", "pyfused-fused", "torch", 1.3),
    Target("cpu", "small", "step", "speedup", "pyfused-fused", "torch", 10.0),
]


# ----------------------------------------------------------------------------------------------
# Read bandwidth


class ReadProbe:
    """Read-only bandwidth on one float32 buffer well beyond the caches: x.sum() and torch.dot(x, x),
    each counted as one read of x. Pooled like harness.BandwidthProbe (quiet cells preferred)."""

    KINDS = ("sum", "dot")

    def __init__(self, device: torch.device, mib: int = 256, samples_per_round: int = 2, min_quiet: int = 20):
        self.numel = mib * 2**20 // 4
        self.x = torch.full((self.numel,), 0.5, dtype=torch.float32, device=device)
        self.samples_per_round = samples_per_round
        self.min_quiet = min_quiet
        self.pools = {(kind, quiet): harness.Stats() for kind in self.KINDS for quiet in (True, False)}

    @property
    def mib(self) -> int:
        return self.numel * 4 // 2**20

    @property
    def bytes(self) -> int:
        return self.numel * 4

    def _sum(self):
        return self.x.sum()

    def _dot(self):
        return torch.dot(self.x, self.x)

    def cases(self) -> list[harness.Case]:
        return [harness.Case("rd:sum", self._sum, block=self.samples_per_round, warmup=0),
                harness.Case("rd:dot", self._dot, block=self.samples_per_round, warmup=0)]

    def record(self, stats: dict[str, harness.Stats], quiet: bool = True) -> None:
        for kind in self.KINDS:
            if f"rd:{kind}" in stats:
                self.pools[(kind, quiet)].add(stats[f"rd:{kind}"].samples)

    @property
    def quiet_only(self) -> bool:
        return self.pools[("sum", True)].n >= self.min_quiet

    def pooled(self, kind: str) -> harness.Stats:
        if self.quiet_only:
            return self.pools[(kind, True)]
        return harness.Stats(self.pools[(kind, True)].samples + self.pools[(kind, False)].samples)

    def gbps(self, kind: str | None = None, stats: harness.Stats | None = None) -> float:
        """One kind's median GB/s; kind None: the faster of the two (the read bandwidth)."""
        if kind is None:
            return max(self.gbps(k) for k in self.KINDS)
        stats = stats if stats is not None else self.pooled(kind)
        return self.bytes / stats.p50 / 1e9 if stats.n else math.nan

    @property
    def best(self) -> str:
        return max(self.KINDS, key=lambda k: self.gbps(k) if math.isfinite(self.gbps(k)) else -1.0)

    def gbps_range(self, kind: str) -> tuple[float, float]:
        stats = self.pooled(kind)
        return self.bytes / stats.p80 / 1e9, self.bytes / stats.p20 / 1e9

    def release(self) -> None:
        del self.x


# ----------------------------------------------------------------------------------------------
# Running


@dataclass
class Result:
    section: str  # "norm" or "step"
    device: str
    workload: str
    impl: str
    n_tensors: int
    numel: int
    bytes_per_element: int
    stats: harness.Stats | None = None
    error: str | None = None
    check: bool | None = None  # norm: the value matches float64; step: params match torch's
    check_diff: float | None = None  # norm: relative error; step: max |param - torch's param|
    max_coef: float | None = None  # step: the largest clip coefficient over all calls
    calls: int = 0
    copy_gbps: float = math.nan  # filled in once the whole run's probe samples are pooled
    inplace_gbps: float = math.nan
    read_gbps: float = math.nan
    local_copy_gbps: float = math.nan  # this cell's own probe samples
    local_read_gbps: float = math.nan
    foreign_load: float = math.nan
    planned_samples: int = 0

    @property
    def ok(self) -> bool:
        return self.stats is not None and self.stats.n > 0

    @property
    def ms(self) -> float:
        return self.stats.p50 * 1e3 if self.ok else math.nan

    @property
    def bytes_per_call(self) -> int:
        return self.numel * self.bytes_per_element

    @property
    def gbps(self) -> float:
        return self.bytes_per_call / self.stats.p50 / 1e9 if self.ok else math.nan


def short_error(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:110]}"


def make_grads(device, workload, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = WORKLOADS[workload][1]
    params = [torch.randn(s, generator=generator).to(device) for s in shapes]
    grads = [(torch.randn(s, generator=generator) * 1e-2).to(device) for s in shapes]
    return params, grads


def norm_fn(impl, grads):
    if impl == "pyfused":
        return lambda: pyfused.nn.utils.get_total_norm(grads, 2.0)
    foreach = impl == "torch-foreach"
    return lambda: torch.nn.utils.get_total_norm(grads, 2.0, foreach=foreach)


class StepPath:
    """One clip + AdamW path on its own params, grads and optimizer state; see the docstring for
    the max_norm schedule. Calls are counted; (max_norm, returned norm) pairs kept for the check."""

    def __init__(self, impl, params, grads, start_norm):
        self.impl = impl
        self.params = [p.detach().clone().requires_grad_(True) for p in params]
        for p, g in zip(self.params, grads):
            p.grad = g.clone()
        if impl == "torch":
            self.opt = torch.optim.AdamW(self.params, fused=True)
        else:
            self.opt = pyfused.optim.AdamW(self.params)
        self.max_norm0 = CLIP_START * start_norm
        self.calls = 0
        self.seen = []

    def __call__(self):
        max_norm = self.max_norm0 * CLIP_DECAY ** self.calls
        self.calls += 1
        if self.impl == "torch":
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        elif self.impl == "pyfused-fused":
            norm = pyfused.nn.utils.clip_grad_norm_(self.params, max_norm, optimizer=self.opt)
        else:
            norm = pyfused.nn.utils.clip_grad_norm_(self.params, max_norm)
        self.opt.step()
        self.seen.append((max_norm, norm))  # no host sync on CUDA: read back after timing

    def max_coef(self) -> float:
        return max(m / (float(n) + 1e-6) for m, n in self.seen)


def run_cell(section, device, workload, probe, read_probe, rounds, block, budget_s=None, min_samples=20):
    params, grads = make_grads(device, workload)
    numel = sum(g.numel() for g in grads)
    exact = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    impls = NORM_IMPLS if section == "norm" else STEP_IMPLS
    load = harness.ForeignLoad()
    results, cases, owned = {}, [], {}
    for impl in impls:
        size = NORM_BYTES if section == "norm" else STEP_BYTES[impl]
        r = Result(section, device.type, workload, impl, len(grads), numel, size)
        results[impl] = r
        try:
            fn = norm_fn(impl, grads) if section == "norm" else StepPath(impl, params, grads, exact)
            fn()  # raises here if this path does not run on the device
        except Exception as error:  # noqa: BLE001 - reported in the table, not fatal
            r.error = short_error(error)
            continue
        owned[impl] = fn
        cases.append(harness.Case(impl, fn))
    del params
    probe_stats = {}
    if cases:
        stats = harness.run_interleaved(cases + probe.cases() + read_probe.cases(), rounds=rounds, block=block,
                                        device=device, min_rounds=math.ceil(min_samples / block),
                                        budget_s=budget_s, hard_budget_s=None if budget_s is None else 2 * budget_s)
        probe_stats = {k: stats[k] for k in ("bw:copy", "bw:inplace", "rd:sum", "rd:dot")}
        local_copy = probe.gbps("copy", stats["bw:copy"])
        local_read = max(read_probe.gbps(k, stats[f"rd:{k}"]) for k in ReadProbe.KINDS)
        harness.synchronize(device)
        reference = owned.get("torch")
        for impl, fn in owned.items():
            r = results[impl]
            r.stats = stats[impl]
            r.local_copy_gbps, r.local_read_gbps = local_copy, local_read
            r.planned_samples = min(min_samples, rounds * block)
            if section == "norm":
                value = float(fn())
                r.check_diff = abs(value - exact) / exact
                r.check = r.check_diff < 1e-5
            else:
                r.calls, r.max_coef = fn.calls, fn.max_coef()
                if reference is not None:
                    diff, bad = 0.0, fn.calls != reference.calls
                    for a, b in zip(fn.params, reference.params):
                        diff = max(diff, (a.detach() - b.detach()).abs().max().item())
                        bad = bad or not torch.allclose(a.detach(), b.detach(), rtol=1e-4, atol=1e-5)
                    r.check_diff, r.check = diff, not bad
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


def ratio(results, key, impl, over) -> float:
    """results[over]'s median time / results[impl]'s: how many times faster impl is."""
    mine, other = results.get((*key, impl)), results.get((*key, over))
    if mine is None or other is None or not (mine.ok and other.ok):
        return math.nan
    return other.stats.p50 / mine.stats.p50


def _pct(value) -> int | None:
    return round(100 * value) if math.isfinite(value) else None


def _x(value) -> str | None:
    return f"{value:.2f}x" if math.isfinite(value) else None


def _check(rs) -> str | None:
    checks = [r.check for r in rs if r.ok and r.check is not None]
    if not checks:
        return None
    return "ok" if all(checks) else "MISMATCH"


def norm_table(results, device) -> str:
    cells = list(dict.fromkeys(w for (s, d, w, _i) in results if s == "norm" and d == device))
    if not cells:
        return ""
    headers, groups = ["workload"], [("", 1)]
    for impl in NORM_IMPLS:
        cols = ["ms", "GB/s", "%rd", "%cp"] + ([] if impl == "pyfused" else ["x"])
        headers += cols
        groups.append((f" {impl} ", len(cols)))
    headers += ["noise", "load", "check"]
    groups.append(("", 3))
    rows = []
    for workload in cells:
        row, rs = [workload], []
        for impl in NORM_IMPLS:
            r = results.get(("norm", device, workload, impl))
            if r is not None and r.ok:
                rs.append(r)
                row += [r.ms, r.gbps, _pct(r.gbps / r.read_gbps), _pct(r.gbps / r.copy_gbps)]
            else:
                row += ["n/a", None, None, None]
            if impl != "pyfused":
                row.append(_x(ratio(results, ("norm", device, workload), "pyfused", impl)))
        row += _tail(rs)
        rows.append(row)
    align = "l" + "r" * (len(headers) - 2) + "l"
    return harness.table(headers, rows, align=align, sep=" ", groups=groups) + _not_run(results, device, "norm")


def step_table(results, device) -> str:
    cells = list(dict.fromkeys(w for (s, d, w, _i) in results if s == "step" and d == device))
    if not cells:
        return ""
    headers, groups = ["workload"], [("", 1)]
    for impl in STEP_IMPLS:
        cols = ["ms", "B/el", "GB/s", "%cp"] + ([] if impl == "pyfused-fused" else ["x"])
        headers += cols
        groups.append((f" {impl} ", len(cols)))
    headers += ["coef", "noise", "load", "check"]
    groups.append(("", 4))
    rows = []
    for workload in cells:
        row, rs = [workload], []
        for impl in STEP_IMPLS:
            r = results.get(("step", device, workload, impl))
            if r is not None and r.ok:
                rs.append(r)
                row += [r.ms, r.bytes_per_element, r.gbps, _pct(r.gbps / r.copy_gbps)]
            else:
                row += ["n/a", STEP_BYTES[impl], None, None]
            if impl != "pyfused-fused":
                row.append(_x(ratio(results, ("step", device, workload), "pyfused-fused", impl)))
        coefs = [r.max_coef for r in rs if r.max_coef is not None]
        row.append(f"<={max(coefs):.3f}" if coefs else None)
        row += _tail(rs)
        rows.append(row)
    align = "l" + "r" * (len(headers) - 2) + "l"
    return harness.table(headers, rows, align=align, sep=" ", groups=groups) + _not_run(results, device, "step")


def long_table(results, device) -> str:
    """One row per (section, workload, path), with p20 and p80."""
    headers = ["section", "workload", "path", "B/el", "ms", "p20", "p80", "GB/s", "%read", "%copy",
               "vs pyfused", "check"]
    rows = []
    for (section, dev, workload, impl), r in results.items():
        if dev != device:
            continue
        mine = "pyfused" if section == "norm" else "pyfused-fused"
        if not r.ok:
            rows.append([section, workload, impl, r.bytes_per_element, None, None, None, None, None, None, "n/a", None])
            continue
        x = None if impl == mine else _x(ratio(results, (section, dev, workload), mine, impl))
        check = None if r.check is None else ("ok" if r.check else f"MISMATCH {r.check_diff:.1e}")
        rows.append([section, workload, impl, r.bytes_per_element, r.ms, r.stats.p20 * 1e3, r.stats.p80 * 1e3,
                     r.gbps, f"{100 * r.gbps / r.read_gbps:.0f}%", f"{100 * r.gbps / r.copy_gbps:.0f}%", x, check])
    return harness.table(headers, rows, align="lllrrrrrrrrl") if rows else ""


def _tail(rs) -> list:
    spreads = [r.stats.spread for r in rs]
    load = rs[0].foreign_load if rs else math.nan
    return [f"{100 * max(spreads):.0f}%" if spreads else None,
            f"{100 * load:.0f}%" if math.isfinite(load) else None, _check(rs)]


def _not_run(results, device, section) -> str:
    reasons = {}
    for (s, dev, workload, impl), r in results.items():
        if s == section and dev == device and not r.ok:
            reasons.setdefault(f"{impl}: {r.error}", []).append(workload)
    return "".join(f"\n  n/a: {why} ({', '.join(dict.fromkeys(w))})" for why, w in reasons.items())


def noise_flags(rs) -> list[str]:
    """As bench/optim.py: other processes on our CPUs, a time cap, or a memory-bandwidth dip."""
    flags = []
    rs = [r for r in rs if r is not None]
    if any(r.foreign_load > NOISY_LOAD for r in rs):
        flags.append(f"load {100 * max(r.foreign_load for r in rs):.0f}%")
    if any(r.ok and r.stats.n < r.planned_samples for r in rs):
        flags.append(f"{min(r.stats.n for r in rs if r.ok)} samples (time cap)")
    if any(r.local_copy_gbps < BANDWIDTH_DIP * r.copy_gbps for r in rs):
        r = rs[0]
        flags.append(f"copy bw {r.local_copy_gbps:.0f} of {r.copy_gbps:.0f} GB/s")
    return [f"UNRELIABLE: {', '.join(flags)}"] if flags else []


def check_targets(results, devices, workloads, sections):
    out = []
    for t in TARGETS:
        if t.device not in devices or t.workload not in workloads or t.section not in sections:
            continue
        mine = results.get((t.section, t.device, t.workload, t.impl))
        base = results.get((t.section, t.device, t.workload, t.baseline)) if t.baseline else None
        if t.kind == "share_read":
            label = f"{t.device} {t.workload:5} norm: pyfused share of read bandwidth"
            value = mine.gbps / mine.read_gbps if mine is not None and mine.ok else math.nan
            measured = (f"{100 * value:.0f}% ({mine.gbps:.1f} of {mine.read_gbps:.1f} GB/s)"
                        if math.isfinite(value) else None)
            need = f">= {100 * t.threshold:.0f}%"
        else:
            label = f"{t.device} {t.workload:5} clip+AdamW: pyfused fused vs {t.baseline}"
            value = ratio(results, (t.section, t.device, t.workload), t.impl, t.baseline)
            measured = (f"{value:.2f}x ({base.ms:.2f} / {mine.ms:.2f} ms)" if math.isfinite(value) else None)
            need = f">= {t.threshold:.2f}x"
        if not math.isfinite(value):
            why = next((r.error for r in (mine, base) if r is not None and r.error), "not measured")
            status, measured = "N/A", f"({why})"
        else:
            status = "PASS" if value >= t.threshold else "FAIL"
        note = "; ".join(noise_flags([mine, base]))
        out.append({"target": label, "measured": measured, "need": need, "status": status, "note": note,
                    "value": value, "threshold": t.threshold, "device": t.device, "workload": t.workload,
                    "section": t.section, "check": t.kind, "baseline": t.baseline})
    return out


def plot(results, probes, read_probes, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install matplotlib to get one)")
        return
    devices = sorted({r.device for r in results.values()})
    if not devices:
        return
    fig, axes = plt.subplots(len(devices), 2, figsize=(11, 4.2 * len(devices)), squeeze=False)
    colors = ["#d62728", "#1f77b4", "#7f7f7f"]
    for row, device in enumerate(devices):
        for col, (section, impls) in enumerate((("norm", NORM_IMPLS), ("step", STEP_IMPLS))):
            ax = axes[row][col]
            works = list(dict.fromkeys(w for (s, d, w, _i) in results if s == section and d == device))
            width = 0.8 / len(impls)
            for j, impl in enumerate(impls):
                values = []
                for w in works:
                    r = results.get((section, device, w, impl))
                    values.append(r.gbps if r is not None and r.ok else 0)
                label = impl if section == "norm" else f"{impl} ({STEP_BYTES[impl]} B/el)"
                ax.bar([i + (j - (len(impls) - 1) / 2) * width for i in range(len(works))], values, width,
                       label=label, color=colors[j])
            if section == "norm":
                ax.axhline(read_probes[device].gbps(), color="k", ls="-.", lw=1, label="read bandwidth")
                ax.set_title(f"{device}: global 2-norm, fp32 (4 B/el)", fontsize=9)
            else:
                ax.set_title(f"{device}: clip + AdamW step, fp32", fontsize=9)
            ax.axhline(probes[device].gbps("copy"), color="k", ls="--", lw=1, label="copy bandwidth")
            ax.set_xticks(range(len(works)), [f"{w} ({WORKLOADS[w][0]})" for w in works])
            ax.set_ylabel("effective GB/s")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"plot: {path}")


# ----------------------------------------------------------------------------------------------
# Main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default=None,
                   help=f"comma-separated, from {','.join(WORKLOADS)} (default: both); others (optim.py's) "
                        "are ignored, so ./dev bench can pass one list to both benchmarks")
    p.add_argument("--sections", default="norm,step", help="comma-separated, from norm,step (default: both)")
    p.add_argument("--optimizers", default=None,
                   help="accepted for ./dev bench, which passes optim.py's options on; ignored (always AdamW)")
    harness.add_run_options(p, "call", cell_seconds=8.0, retry_until=75.0)
    p.add_argument("--long", action="store_true", help="add one table row per path, with p20 and p80")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 if a target FAILs, a pyfused path does not run, or a check disagrees")
    args = p.parse_args(argv)
    if args.workloads is None:
        args.workloads = list(WORKLOADS)
    else:
        chosen = [x.strip().lower() for x in args.workloads.split(",") if x.strip()]
        args.workloads = [w for w in WORKLOADS if w in chosen]
    args.sections = harness.choices(p, "--sections", args.sections, ("norm", "step"))
    harness.finish_run_options(args)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.workloads:
        print(f"clip bench: none of its workloads ({', '.join(WORKLOADS)}) was asked for; nothing to do")
        return 0
    devices = harness.selected_devices(args)
    if not devices:
        return 0

    meta = harness.machine_info(devices)
    out = harness.ResultsFile("clip", meta)
    print(harness.describe_machine(meta))
    print(f"timing: up to {args.rounds} rounds x {args.block} timed calls per case, each block after 1 untimed "
          f"call (at least {min(args.rounds, math.ceil(20 / args.block)) * args.block} samples; a cell stops "
          f"adding rounds after {args.cell_seconds:g} s); paths and bandwidth probes interleaved round-robin; "
          f"median [p20, p80]")
    print("GB/s counts these bytes per element (fp32, 4 B a value), 1 GB = 1e9 B:")
    if "norm" in args.sections:
        print("  norm alone, every path: 4 B = one read of the grads")
    if "step" in args.sections:
        for impl in STEP_IMPLS:
            print(f"  clip + AdamW, {STEP_LABELS[impl]}: {STEP_BYTES[impl]} B = {STEP_COUNTED[impl]}")
        print(f"  ({ADAMW_COUNTED})")
        print(f"clipping: call k clips with max_norm = {CLIP_START:g} x |g0| x {CLIP_DECAY:g}^k, so the coefficient "
              f"is < 1 at every call\n  (in-place paths: {CLIP_DECAY:g} of their already clipped grads; fused: "
              f"{CLIP_START:g} x {CLIP_DECAY:g}^k of the untouched g0); no restore pass")
    print(f"results: {out.path}\n")

    results, probes, read_probes = {}, {}, {}
    started = time.perf_counter()
    run_load = harness.ForeignLoad()
    for device in devices:
        probe = harness.BandwidthProbe(device, mib=args.probe_mib)
        read_probe = ReadProbe(device, mib=args.probe_mib)
        probes[device.type], read_probes[device.type] = probe, read_probe
        for section in args.sections:
            for workload in args.workloads:
                best = None
                for _attempt in range(1 + args.retries):
                    t0 = time.perf_counter()
                    cell, probe_stats = run_cell(section, device, workload, probe, read_probe, args.rounds,
                                                 args.block, args.cell_seconds)
                    measured = [i for i, r in cell.items() if r.ok]
                    busy = next(iter(cell.values())).foreign_load
                    n = min((cell[i].stats.n for i in measured), default=0)
                    print(f"  [{device.type}] {section}/{workload}: {len(measured)} of {len(cell)} paths x {n} "
                          f"samples, {time.perf_counter() - t0:.1f} s, other processes {100 * busy:.0f}% of "
                          "the CPUs", flush=True)
                    if best is None or not busy >= best[2]:
                        best = (cell, probe_stats, busy)
                    if not busy > NOISY_LOAD or time.perf_counter() - started + (time.perf_counter() - t0) > args.retry_until:
                        break
                    print("    measuring this cell again (kept: the attempt with the least foreign load)")
                cell, probe_stats, busy = best
                probe.record(probe_stats, quiet=not busy > NOISY_LOAD)
                read_probe.record(probe_stats, quiet=not busy > NOISY_LOAD)
                for impl, r in cell.items():
                    results[(section, device.type, workload, impl)] = r
        probe.release()
        read_probe.release()

    for r in results.values():
        r.copy_gbps = probes[r.device].gbps("copy")
        r.inplace_gbps = probes[r.device].gbps("inplace")
        r.read_gbps = read_probes[r.device].gbps()
    busy = run_load.share()
    print(f"\nmeasured in {time.perf_counter() - started:.0f} s; other processes took {100 * busy:.0f}% of the "
          f"{meta['cpu_count']} CPUs meanwhile" + (" -- timings competed with them, expect noise" if busy > 0.05 else ""))

    for device in devices:
        dev = device.type
        probe, read_probe = probes[dev], read_probes[dev]
        print(f"\n=== {dev.upper()} ===")
        for kind, what in (("copy", "dst.copy_(src), read+write"), ("inplace", "a.add_(b, alpha=s), 2 reads+1 write")):
            stats = probe.copy if kind == "copy" else probe.inplace
            lo, hi = probe.gbps_range(kind)
            print(f"{kind + ' bandwidth:':21} {probe.gbps(kind):6.1f} GB/s  [p80..p20 time: {lo:.1f}..{hi:.1f}]  "
                  f"({what}, 2 x {probe.mib} MiB fp32)")
            out.append({"kind": "bandwidth", "device": dev, "probe": kind, "gbps": probe.gbps(kind),
                        "gbps_p80_time": lo, "gbps_p20_time": hi, "buffer_mib": probe.mib,
                        "bytes_per_call": probe.bytes(kind), "basis": probe.basis, "ms_p50": stats.p50 * 1e3,
                        "ms_p20": stats.p20 * 1e3, "ms_p80": stats.p80 * 1e3, "n_samples": stats.n})
        for kind, what in (("sum", "x.sum()"), ("dot", "torch.dot(x, x)")):
            stats = read_probe.pooled(kind)
            lo, hi = read_probe.gbps_range(kind)
            mark = "  <- read bandwidth" if kind == read_probe.best else ""
            print(f"{'read bandwidth, ' + kind + ':':21} {read_probe.gbps(kind):6.1f} GB/s  [p80..p20 time: "
                  f"{lo:.1f}..{hi:.1f}]  ({what}, one read, 1 x {read_probe.mib} MiB fp32){mark}")
            out.append({"kind": "bandwidth", "device": dev, "probe": f"read-{kind}", "gbps": read_probe.gbps(kind),
                        "gbps_p80_time": lo, "gbps_p20_time": hi, "buffer_mib": read_probe.mib,
                        "bytes_per_call": read_probe.bytes, "is_read_reference": kind == read_probe.best,
                        "ms_p50": stats.p50 * 1e3, "ms_p20": stats.p20 * 1e3, "ms_p80": stats.p80 * 1e3,
                        "n_samples": stats.n})
        print(f"{'':21} probes interleaved with every cell; {probe.basis}")

        text = norm_table(results, dev)
        if text:
            print("\nnorm alone, fp32 grads, p = 2: ms = median ms/call; GB/s = one read of the grads / median; "
                  "%rd, %cp = GB/s as %\nof the read and copy bandwidths above; x = that torch path's time / "
                  "pyfused's (pyfused speedup, < 1: slower);\nnoise = largest (p80-p20)/median of the row; load = "
                  "other processes' CPU share; check = every norm within 1e-5 of float64\n\n" + text)
        text = step_table(results, dev)
        if text:
            print("\nclip + AdamW step, fp32: ms = median ms/step (clip_grad_norm_ + step); B/el = bytes counted per "
                  "element (above);\nGB/s = B/el x elements / median; %cp = GB/s as % of copy bandwidth; x = that "
                  "path's time / pyfused\nfused's (speedup of fusing); coef = largest clip coefficient over all calls "
                  "(< 1: clipping active at\nevery step); check = params match torch's after the run\n\n" + text)
            for workload in args.workloads:
                fused = results.get(("step", dev, workload, "pyfused-fused"))
                unfused = results.get(("step", dev, workload, "pyfused-unfused"))
                if fused is not None and unfused is not None and fused.ok and unfused.ok:
                    saved = unfused.ms - fused.ms
                    print(f"  {workload}: fusing the clip into the step {'saves' if saved >= 0 else 'COSTS'} "
                          f"{abs(saved):.2f} ms ({100 * abs(saved) / unfused.ms:.0f}% of the unfused step), "
                          f"for 8 B/el = {unfused.numel * 8 / 1e6:.0f} MB less traffic (the scale pass)")
        if args.long:
            print("\n" + long_table(results, dev))

    for (section, dev, workload, impl), r in results.items():
        row = {"kind": section, "device": dev, "workload": workload, "workload_desc": WORKLOADS[workload][0],
               "impl": impl, "status": "ok" if r.ok else "n/a", "error": r.error, "n_tensors": r.n_tensors,
               "numel": r.numel, "bytes_per_element": r.bytes_per_element, "bytes_per_call": r.bytes_per_call}
        if section == "step":
            row.update({"label": STEP_LABELS[impl], "counted": STEP_COUNTED[impl], "clip_start": CLIP_START,
                        "clip_decay": CLIP_DECAY, "calls": r.calls, "max_clip_coef": r.max_coef})
        if r.ok:
            mine = "pyfused" if section == "norm" else "pyfused-fused"
            row.update({"ms_p50": r.ms, "ms_p20": r.stats.p20 * 1e3, "ms_p80": r.stats.p80 * 1e3,
                        "n_samples": r.stats.n, "gbps": r.gbps, "copy_gbps": r.copy_gbps,
                        "inplace_gbps": r.inplace_gbps, "read_gbps": r.read_gbps,
                        "share_copy": r.gbps / r.copy_gbps, "share_read": r.gbps / r.read_gbps,
                        "local_copy_gbps": r.local_copy_gbps, "local_read_gbps": r.local_read_gbps,
                        "pyfused_speedup": None if impl == mine else ratio(results, (section, dev, workload), mine, impl),
                        "check": r.check, "check_diff": r.check_diff, "rounds": args.rounds, "block": args.block,
                        "foreign_cpu_share": r.foreign_load})
        out.append(row)

    targets = check_targets(results, [d.type for d in devices], args.workloads, args.sections)
    if targets:
        print("\ntargets (issue 4, CPU):")
        print(harness.table(["target", "measured", "need", "result", "note"],
                            [[t["target"], t["measured"], t["need"], t["status"], t["note"]] for t in targets],
                            align="lllll"))
        counts = {s: sum(t["status"] == s for t in targets) for s in ("PASS", "FAIL", "N/A")}
        print(" ".join(f"{n} {s}" for s, n in counts.items() if n))
        for t in targets:
            out.append({"kind": "target", **t})

    mismatches = [r for r in results.values() if r.check is False]
    for r in mismatches:
        what = "norm off float64 by" if r.section == "norm" else "params differ from torch's by up to"
        print(f"WARNING: {r.device} {r.section} {r.workload} {r.impl}: {what} {r.check_diff:.2e}")
    inactive = [r for r in results.values() if r.max_coef is not None and not r.max_coef < 1]
    for r in inactive:
        print(f"WARNING: {r.device} {r.workload} {r.impl}: clip coefficient reached {r.max_coef:.6f} (not clipping)")
    if not args.no_plot:
        plot(results, probes, read_probes, out.stem.with_suffix(".png"))
    print(f"rows: {out.path}")

    broken = [r for r in results.values() if r.impl.startswith("pyfused") and not r.ok]
    if args.strict and (broken or mismatches or inactive or any(t["status"] == "FAIL" for t in targets)):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
