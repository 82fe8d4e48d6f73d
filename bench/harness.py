"""Shared benchmark harness: interleaved timing, quantiles, bandwidth probes, metadata, output.

The model is Liger-Kernel's benchmark/ layout: one script per op family (bench/optim.py), this
shared harness, one JSON-lines row per measurement carrying the machine, versions and time, and a
readable table (plus a plot where matplotlib is available).

Timing. `run_interleaved` takes several cases (callables) and runs them in rounds. In every round
each case gets a short block: `warmup` untimed calls, then `block` calls timed one by one; the
order of the cases rotates from round to round. Machine noise (other tenants, frequency changes)
therefore hits every case alike instead of landing on whichever case ran during the bad second,
and the untimed call at the top of each block puts every case in the same cache state (the other
cases ran in between). Statistics are the median and the 20th/80th percentiles of all timed calls.
CPU calls are timed with time.perf_counter; CUDA calls with CUDA events, synchronized at the end of
each block.

Bandwidth. `BandwidthProbe` adds two cases to every interleaved run: a copy `dst.copy_(src)`
(counted as 2 accesses per element: read src, write dst; the write-allocate read that a copy also
pays is not counted) and an in-place `a.add_(b, alpha=s)` (3 accesses: read a, read b, write a),
both on float32 buffers of 256 MiB each, well beyond the caches, with torch's own threads. Their
samples are pooled over the whole run, so a result's share of the bandwidth is taken against
bandwidth measured side by side with it.
"""

from __future__ import annotations

import datetime
import gc
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------------------------
# Statistics


def quantile(sorted_samples: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default) of already sorted samples."""
    if not sorted_samples:
        return math.nan
    pos = q * (len(sorted_samples) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_samples) - 1)
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * (pos - lo)


@dataclass
class Stats:
    """Seconds per call: median and 20th/80th percentiles of the timed calls."""

    samples: list[float] = field(default_factory=list)

    def add(self, more: list[float]) -> None:
        self.samples.extend(more)

    @property
    def n(self) -> int:
        return len(self.samples)

    def q(self, q: float) -> float:
        return quantile(sorted(self.samples), q)

    @property
    def p50(self) -> float:
        return self.q(0.5)

    @property
    def p20(self) -> float:
        return self.q(0.2)

    @property
    def p80(self) -> float:
        return self.q(0.8)

    @property
    def spread(self) -> float:
        """(p80 - p20) / p50: the relative noise of this measurement."""
        return (self.p80 - self.p20) / self.p50 if self.samples else math.nan


# ----------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], count: int, device: torch.device) -> list[float]:
    """Times `count` calls of fn one by one; seconds per call."""
    if count <= 0:
        return []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
        torch.cuda.synchronize(device)
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 for start, end in events]
    out = []
    clock = time.perf_counter
    for _ in range(count):
        t0 = clock()
        fn()
        out.append(clock() - t0)
    return out


@dataclass
class Case:
    """One thing to time. `block` and `warmup` override the run's defaults for this case."""

    name: str
    fn: Callable[[], object]
    block: int | None = None
    warmup: int | None = None


def run_interleaved(
    cases: list[Case],
    *,
    rounds: int,
    block: int,
    warmup: int = 1,
    device: torch.device = torch.device("cpu"),
    initial_warmup: int = 2,
    min_rounds: int | None = None,
    budget_s: float | None = None,
    hard_budget_s: float | None = None,
) -> dict[str, Stats]:
    """Round-robin blocks over the cases (see the module docstring). Returns Stats per case name.

    With budget_s, rounds stop early once min_rounds are done and budget_s seconds have passed,
    so a run on a loaded machine (where some paths slow down tenfold) stays bounded; after
    hard_budget_s they stop even short of min_rounds. Every case always gets the same number of
    rounds, hence the same number of calls.
    """
    stats = {c.name: Stats() for c in cases}
    for c in cases:  # first touches, lazy state, allocator and thread-pool start-up
        for _ in range(initial_warmup):
            c.fn()
    synchronize(device)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    started = time.perf_counter()
    min_rounds = rounds if min_rounds is None else min(min_rounds, rounds)
    try:
        for r in range(rounds):
            elapsed = time.perf_counter() - started
            if budget_s is not None and r >= min_rounds and elapsed > budget_s:
                break
            if hard_budget_s is not None and r >= 1 and elapsed > hard_budget_s:
                break
            shift = r % len(cases)
            for c in cases[shift:] + cases[:shift]:
                for _ in range(warmup if c.warmup is None else c.warmup):
                    c.fn()
                stats[c.name].add(time_calls(c.fn, block if c.block is None else c.block, device))
    finally:
        if gc_was_enabled:
            gc.enable()
    return stats


# ----------------------------------------------------------------------------------------------
# Bandwidth probes


class BandwidthProbe:
    """Copy and in-place `a += s*b` bandwidth on float32 buffers well beyond the caches.

    `cases()` gives the two probe cases to put into every interleaved run; `record()` keeps their
    samples, marked quiet or not (whether other processes left the machine alone meanwhile);
    `copy` and `inplace` are the pooled Stats (seconds per call) of the quiet samples when there
    are at least `min_quiet` of them, else of all samples; `gbps(kind)` is their median bandwidth
    in GB/s (1e9 bytes per second).
    """

    COPY_ACCESSES = 2  # read src, write dst
    INPLACE_ACCESSES = 3  # read a, read b, write a

    def __init__(self, device: torch.device, mib: int = 256, samples_per_round: int = 2, min_quiet: int = 20):
        self.device = device
        self.numel = mib * 2**20 // 4
        self.a = torch.full((self.numel,), 1.0, dtype=torch.float32, device=device)
        self.b = torch.full((self.numel,), 0.5, dtype=torch.float32, device=device)
        self.samples_per_round = samples_per_round
        self.min_quiet = min_quiet
        self.pools = {(kind, quiet): Stats() for kind in ("copy", "inplace") for quiet in (True, False)}

    @property
    def mib(self) -> int:
        return self.numel * 4 // 2**20

    def bytes(self, kind: str) -> int:
        accesses = self.COPY_ACCESSES if kind == "copy" else self.INPLACE_ACCESSES
        return accesses * self.numel * 4

    def _copy(self):
        self.a.copy_(self.b)

    def _inplace(self):
        self.a.add_(self.b, alpha=1e-3)

    def cases(self) -> list[Case]:
        return [
            Case("bw:copy", self._copy, block=self.samples_per_round, warmup=0),
            Case("bw:inplace", self._inplace, block=self.samples_per_round, warmup=0),
        ]

    def record(self, stats: dict[str, Stats], quiet: bool = True) -> None:
        """Pools the probe samples of one interleaved run."""
        for kind in ("copy", "inplace"):
            if f"bw:{kind}" in stats:
                self.pools[(kind, quiet)].add(stats[f"bw:{kind}"].samples)

    @property
    def quiet_only(self) -> bool:
        return self.pools[("copy", True)].n >= self.min_quiet

    def _pooled(self, kind: str) -> Stats:
        if self.quiet_only:
            return self.pools[(kind, True)]
        return Stats(self.pools[(kind, True)].samples + self.pools[(kind, False)].samples)

    @property
    def copy(self) -> Stats:
        return self._pooled("copy")

    @property
    def inplace(self) -> Stats:
        return self._pooled("inplace")

    @property
    def basis(self) -> str:
        quiet, loud = self.pools[("copy", True)].n, self.pools[("copy", False)].n
        if self.quiet_only:
            return f"{quiet} samples from the quiet cells" + (f", {loud} from loaded cells left out" if loud else "")
        return f"{quiet + loud} samples, {loud} of them taken while other processes loaded the machine"

    def gbps(self, kind: str, stats: Stats | None = None) -> float:
        stats = stats if stats is not None else self._pooled(kind)
        return self.bytes(kind) / stats.p50 / 1e9 if stats.n else math.nan

    def gbps_range(self, kind: str) -> tuple[float, float]:
        """(GB/s at the slow p80 time, GB/s at the fast p20 time)."""
        stats = self._pooled(kind)
        return self.bytes(kind) / stats.p80 / 1e9, self.bytes(kind) / stats.p20 / 1e9

    def release(self) -> None:
        del self.a, self.b


# ----------------------------------------------------------------------------------------------
# Other processes


class ForeignLoad:
    """How much CPU other processes took while we measured (Linux /proc; NaN elsewhere).

    share() is the other processes' CPU time as a fraction of the machine's capacity (all CPUs)
    since the object was made: 0 on a quiet machine; on 2 CPUs, one busy neighbour is 0.5. Any
    non-zero figure means the timings competed for cores and memory bandwidth.
    """

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:9]]
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            own = int(fields[11]) + int(fields[12])  # utime + stime, all threads, in USER_HZ ticks
        except (OSError, ValueError, IndexError):
            return None
        idle = values[3] + values[4]
        return sum(values), idle, own

    def share(self) -> float:
        end = self._read()
        if self.start is None or end is None:
            return math.nan
        total = end[0] - self.start[0]
        busy = total - (end[1] - self.start[1])
        own = end[2] - self.start[2]
        return max(0.0, busy - own) / total if total > 0 else math.nan


# ----------------------------------------------------------------------------------------------
# Metadata


def _cpu_model() -> dict:
    info = {"model_name": platform.processor() or platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    info["model_name"] = value.strip()
                elif key in ("cpu family", "model", "stepping") and key.replace(" ", "_") not in info:
                    info[key.replace(" ", "_")] = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    info["simd"] = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_tile") if f in flags]
                    break
    except OSError:
        pass
    try:
        l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        info["l3"] = l3
    except OSError:
        pass
    return info


def _git() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        return {"commit": commit or None, "dirty": bool(dirty)}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine_info(devices: list[torch.device]) -> dict:
    """Machine, versions and settings, stored in every JSON row."""
    import pyfused

    try:
        from pyfused import _cpp

        isa = _cpp.isa()
    except Exception as error:  # noqa: BLE001 - a broken build is reported, not fatal here
        isa = f"unavailable ({error})"
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    info = {
        "host": socket.gethostname(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "pyfused": getattr(pyfused, "__version__", None),
        "pyfused_isa": isa,
        "git": _git(),
        "env": {k: os.environ[k] for k in ("PYFUSED_BACKEND", "PYFUSED_CPU_ISA", "OMP_NUM_THREADS") if k in os.environ},
    }
    if any(d.type == "cuda" for d in devices):
        props = torch.cuda.get_device_properties(0)
        info["cuda"] = {
            "device": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "sms": props.multi_processor_count,
            "torch_cuda": torch.version.cuda,
        }
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def describe_machine(info: dict) -> str:
    cpu = info["cpu"]
    lines = [
        f"machine: {cpu.get('model_name')} (family {cpu.get('cpu_family')} model {cpu.get('model')}, "
        f"L3 {cpu.get('l3', '?')}), {info['cpu_count']} CPUs ({info['cpu_affinity']} usable), "
        f"torch threads {info['torch_threads']}",
        f"versions: torch {info['torch']}, pyfused {info['pyfused']} (ISA {info['pyfused_isa']}), "
        f"python {info['python']}, git {(info['git']['commit'] or '?')[:10]}{' (dirty)' if info['git']['dirty'] else ''}",
    ]
    if info["env"]:
        lines.append("env: " + " ".join(f"{k}={v}" for k, v in info["env"].items()))
    if "cuda" in info:
        c = info["cuda"]
        lines.append(f"gpu: {c['device']} (sm {c['capability']}, {c['memory_gib']} GiB, {c['sms']} SMs), "
                     f"CUDA {c['torch_cuda']}, triton {info.get('triton')}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Output


class ResultsFile:
    """bench/results/<name>-<timestamp>.jsonl: one JSON object per line, each with the metadata."""

    def __init__(self, name: str, meta: dict, directory: Path = RESULTS_DIR):
        self.started = datetime.datetime.now(datetime.timezone.utc)
        stamp = self.started.strftime("%Y%m%d-%H%M%S")
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{name}-{stamp}.jsonl"
        self.stem = self.path.with_suffix("")
        self.name = name
        self.meta = meta
        self.rows: list[dict] = []

    def append(self, row: dict) -> None:
        row = {
            "bench": self.name,
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "run_started": self.started.isoformat(timespec="seconds"),
            **row,
            "machine": self.meta,
        }
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def table(headers: list[str], rows: list[list], align: str | None = None, sep: str = "  ",
          groups: list[tuple[str, int]] | None = None) -> str:
    """A fixed-width text table.

    align: one 'l' or 'r' per column (default: 'r' for columns holding numbers). groups: optional
    (title, number of columns) pairs, left to right, printed as a line of titles above the headers.
    """
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    if align is None:
        align = "".join("r" if any(isinstance(row[i], (int, float)) for row in rows) else "l" for i in range(len(headers)))

    def fmt(values):
        return sep.join(v.rjust(w) if a == "r" else v.ljust(w) for v, w, a in zip(values, widths, align)).rstrip()

    out = []
    if groups:  # widen a group's first column where its title needs the room
        start = 0
        for title, span in groups:
            width = sum(widths[start:start + span]) + len(sep) * (span - 1)
            if title and width < len(title) + 2:
                widths[start] += len(title) + 2 - width
            start += span
        titles, start = [], 0
        for title, span in groups:
            width = sum(widths[start:start + span]) + len(sep) * (span - 1)
            titles.append(title.center(width, "-") if title else " " * width)
            start += span
        out.append(sep.join(titles).rstrip())
    out += [fmt(headers), fmt(["-" * w for w in widths])]
    out += [fmt(r) for r in cells]
    return "\n".join(out)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3f}"
    return str(value)


# ----------------------------------------------------------------------------------------------
# What every benchmark script shares on its command line

NOISY_LOAD = 0.10  # other processes' CPU share above which a target's verdict is flagged unreliable


def add_run_options(p, unit: str, cell_seconds: float, retry_until: float) -> None:
    """The timing, device and output options of every benchmark; `unit` names what one timed
    call is (a step, a call)."""
    p.add_argument("--quick", action="store_true", help=f"a smoke run: 2 rounds of 2 timed {unit}s per case")
    p.add_argument("--device", default="all", choices=("cpu", "cuda", "all"),
                   help="cpu, cuda, or all: cpu plus cuda when a CUDA device is present (default)")
    p.add_argument("--rounds", type=int, default=None, help="round-robin rounds (default 10; --quick 2)")
    p.add_argument("--block", type=int, default=None, help=f"timed {unit}s per case per round (default 5; --quick 2)")
    p.add_argument("--cell-seconds", type=float, default=cell_seconds,
                   help="stop a cell's rounds after this long once every case has 20 samples, and after "
                        f"twice this long in any case (default {cell_seconds:g}; bounds the run on a loaded machine)")
    p.add_argument("--retries", type=int, default=1,
                   help="measure a cell again, up to this many times, while other processes took more than "
                        f"{100 * NOISY_LOAD:.0f}%% of the CPUs during it (default 1)")
    p.add_argument("--retry-until", type=float, default=retry_until,
                   help=f"no retry that would take the run past this many seconds (default {retry_until:g})")
    p.add_argument("--probe-mib", type=int, default=256, help="size of each bandwidth-probe buffer (default 256)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--no-plot", action="store_true", help="do not draw the PNG")


def finish_run_options(args) -> None:
    args.rounds = args.rounds or (2 if args.quick else 10)
    args.block = args.block or (2 if args.quick else 5)
    if args.threads:
        torch.set_num_threads(args.threads)


def choices(parser, flag: str, text: str, allowed) -> list:
    """A comma-separated option's values, in `allowed`'s order; an unknown one is an error."""
    chosen = [x.strip().lower() for x in text.split(",") if x.strip()]
    bad = [x for x in chosen if x not in allowed]
    if bad or not chosen:
        parser.error(f"{flag}: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(allowed)}")
    return [k for k in allowed if k in chosen]


def selected_devices(args) -> list:
    """The devices --device asks for that are present (saying why CUDA is skipped)."""
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all"):
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        else:
            print("GPU section skipped: no CUDA device is present "
                  f"(torch {torch.__version__}, torch.cuda.is_available() is False)")
    return devices
