"""What every family shares: timing, probes, metadata, rows, tables and targets.

A family script (optim.py, clip.py, ...) only says what it measures: a list of Cells, each one op
on one workload with the implementations to compare and the bytes one call counts. This module
times the cells and turns the timings into rows, tables and PASS/FAIL verdicts.

Timing. A cell's implementations and the bandwidth probes run in rounds. In every round each case
gets a block: one untimed call, then `block` calls timed one by one (CUDA events on CUDA, each
block synchronized at its end); the order of the cases rotates from round to round. Machine noise
(other tenants, frequency changes) therefore hits every case alike, and the untimed call puts
every case in the same cache state. Figures are the median and the 20th/80th percentiles.

Probes. Beside every cell (except the one-thread, in-cache ones) run, on fp32 buffers of
`probe_mib` each, on the cell's device and torch's threads: a copy `dst.copy_(src)` counted as 2
accesses per element (the write-allocate read is not counted), and two reads counted as one access,
`x.sum()` and `torch.dot(x, x)`; the read bandwidth is the faster of those two. Their samples are
pooled over the run, so every share of bandwidth is taken against bandwidth measured beside it.
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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
NOISY_LOAD = 0.10  # other processes' CPU share above which a verdict is marked unreliable

# mode: rounds, timed calls per block, seconds after which a cell adds no rounds, probe buffer MiB
MODES = {"tiny": (1, 1, 1.0, 4), "quick": (3, 2, 3.0, 256), "full": (10, 5, 15.0, 256)}


@dataclass
class Config:
    mode: str  # "tiny" (the test suite's sizes), "quick" or "full"
    device: torch.device
    rounds: int
    block: int
    cell_seconds: float
    probe_mib: int

    @classmethod
    def make(cls, mode: str, device: torch.device) -> "Config":
        return cls(mode, device, *MODES[mode])

    @property
    def cpu(self) -> bool:
        return self.device.type == "cpu"

    def pick(self, quick: list, full: list, tiny: list) -> list:
        """A sweep's points in this mode."""
        return {"quick": quick, "full": full, "tiny": tiny}[self.mode]

    def shapes(self, shapes: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """A workload's shapes; in tiny mode at most 4 tensors of at most 1,024 elements."""
        if self.mode != "tiny":
            return shapes
        return [(min(math.prod(s), 1024),) for s in shapes[:4]]


# ----------------------------------------------------------------------------------------------
# What a family describes


@dataclass
class Run:
    """One implementation, ready: fn is one timed call. outputs() gives the tensors compared
    across implementations after timing; extra() gives figures for its row."""

    fn: Callable[[], object]
    outputs: Callable[[], list[torch.Tensor]] | None = None
    extra: Callable[[], dict] | None = None


@dataclass
class Cell:
    family: str
    table: str  # the table (and plot panel) the cell belongs to
    op: str
    workload: str  # short key, named by targets
    desc: str  # what the workload is
    n_tensors: int
    numel: int
    bytes: int | dict[str, int]  # bytes one call counts: for every implementation, or per implementation
    setup: Callable[[], dict[str, Callable[[], Run]]]  # makes the data; implementation -> its factory
    ours: str = "pyfused"  # the others' columns say how many times faster this one is
    bandwidth: str = "copy"  # the probe a share is taken against: "copy" or "read"
    tol: tuple[float, float] = (1e-4, 1e-5)  # rtol, atol of the cross-implementation check
    one_thread: bool = False  # timed on one thread without probes: elements per ns (in-cache cases)
    repeat: int = 1  # calls per timed sample (short calls)
    sweep: str | None = None  # "size" or "count": plotted as GB/s against x
    x: int | None = None
    rounds: int | None = None  # instead of the run's, all of them whatever the time
    block: int | None = None
    show: dict[str, str] = field(default_factory=dict)  # column title -> key of Run.extra()'s dict


@dataclass(frozen=True)
class Target:
    source: str  # the issue that set it
    device: str
    op: str
    workload: str
    kind: str  # "speedup" (baseline time / ours), "share" (of the cell's bandwidth), "us_per_tensor" (<=)
    threshold: float
    baselines: tuple[str, ...] = ()  # the first one measured is used
    impl: str = "pyfused"


# ----------------------------------------------------------------------------------------------
# Timing


class Stats:
    """Seconds per call of the timed calls."""

    def __init__(self, samples=()):
        self.samples = list(samples)

    def q(self, q: float) -> float:
        s = sorted(self.samples)
        if not s:
            return math.nan
        pos = q * (len(s) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], count: int, device: torch.device, repeat: int = 1) -> list[float]:
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
        torch.cuda.synchronize(device)
        for start, end in events:
            start.record()
            for _ in range(repeat):
                fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) / 1e3 / repeat for start, end in events]
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        out.append((time.perf_counter() - t0) / repeat)
    return out


@dataclass
class Case:
    name: str
    fn: Callable[[], object]
    block: int | None = None
    warmup: int = 1
    repeat: int = 1


def run_interleaved(cases: list[Case], rounds: int, block: int, device: torch.device,
                    budget_s: float | None = None, min_rounds: int = 1) -> dict[str, Stats]:
    """Rounds of blocks, rotating the order (see the module docstring). Past budget_s seconds no
    round starts once min_rounds are done, past 3 x budget_s none after the first (a loaded machine,
    where torch's OpenMP paths slow down tenfold); every case always gets the same number of calls."""
    stats = {c.name: Stats() for c in cases}
    for c in cases:
        for _ in range(c.warmup):
            c.fn()
    synchronize(device)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    started = time.perf_counter()
    try:
        for r in range(rounds):
            elapsed = time.perf_counter() - started
            if budget_s is not None and (r >= min_rounds and elapsed > budget_s or r >= 1 and elapsed > 3 * budget_s):
                break
            shift = r % len(cases)
            for c in cases[shift:] + cases[:shift]:
                for _ in range(c.warmup):
                    c.fn()
                stats[c.name].samples += time_calls(c.fn, c.block or block, device, c.repeat)
    finally:
        if gc_was_enabled:
            gc.enable()
    return stats


class Probes:
    """The copy and read bandwidths of the run (see the module docstring)."""

    def __init__(self, device: torch.device, mib: int):
        n = mib * 2**20 // 4
        self.device, self.mib = device, mib
        self.a = torch.full((n,), 1.0, device=device)
        self.b = torch.full((n,), 0.5, device=device)
        self.kinds = {  # name: (call, bytes counted, what)
            "copy": (lambda: self.a.copy_(self.b), 8 * n, "dst.copy_(src), read + write"),
            "read-sum": (lambda: self.b.sum(), 4 * n, "x.sum(), one read"),
            "read-dot": (lambda: torch.dot(self.b, self.b), 4 * n, "torch.dot(x, x), one read"),
        }
        self.stats = {k: Stats() for k in self.kinds}

    def cases(self) -> list[Case]:
        return [Case(f"probe:{k}", fn, block=1, warmup=0) for k, (fn, _b, _w) in self.kinds.items()]

    def record(self, stats: dict[str, Stats]) -> None:
        for k in self.kinds:
            self.stats[k].samples += stats.get(f"probe:{k}", Stats()).samples

    def gbps(self, kind: str, q: float = 0.5) -> float:
        """GB/s (1e9 B/s) at the q-quantile time; "read": the faster of the two reads."""
        if kind == "read":
            return max(self.gbps("read-sum", q), self.gbps("read-dot", q))
        return self.kinds[kind][1] / self.stats[kind].q(q) / 1e9 if self.stats[kind].samples else math.nan

    def rows(self) -> list[dict]:
        return [{"kind": "probe", "device": self.device.type, "probe": k, "what": what, "buffer_mib": self.mib,
                 "bytes_per_call": size, "gbps": self.gbps(k), "gbps_at_p80_time": self.gbps(k, 0.8),
                 "gbps_at_p20_time": self.gbps(k, 0.2), "n_samples": len(self.stats[k].samples)}
                for k, (_fn, size, what) in self.kinds.items()]


class ForeignLoad:
    """Other processes' CPU time as a share of all CPUs since creation (Linux /proc; NaN elsewhere)."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read():
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:9]]
            with open("/proc/self/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        return sum(values), values[3] + values[4], int(fields[11]) + int(fields[12])  # total, idle, own

    def share(self) -> float:
        end = self._read()
        if self.start is None or end is None or end[0] <= self.start[0]:
            return math.nan
        total = end[0] - self.start[0]
        busy = total - (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(0.0, busy) / total


# ----------------------------------------------------------------------------------------------
# Measuring one cell


def short_error(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:100]}"


def measure(cell: Cell, cfg: Config, probes: Probes) -> list[dict]:
    """One row per implementation of the cell: timings, check against the reference, errors."""
    rows, runs = {}, {}
    for impl, make in cell.setup().items():
        size = cell.bytes[impl] if isinstance(cell.bytes, dict) else cell.bytes
        rows[impl] = {"kind": "measurement", "family": cell.family, "table": cell.table, "op": cell.op,
                      "workload": cell.workload, "impl": impl,
                      "desc": cell.desc if cfg.mode != "tiny" else f"{cell.n_tensors} x <= 1,024 values (--tiny)", "ours": cell.ours,
                      "device": cfg.device.type, "n_tensors": cell.n_tensors, "numel": cell.numel,
                      "bytes_per_call": size, "bandwidth_probe": None if cell.one_thread else cell.bandwidth,
                      "one_thread": cell.one_thread, "sweep": cell.sweep, "x": cell.x, "show": cell.show,
                      "status": "n/a", "error": None}
        try:
            run = make()
            run.fn()  # raises here if this implementation does not run on this device
            runs[impl] = run
        except Exception as error:  # noqa: BLE001 - reported in the table, not fatal
            rows[impl]["error"] = short_error(error)
    threads = torch.get_num_threads()
    load = ForeignLoad()
    if runs:
        cases = [Case(impl, run.fn, repeat=cell.repeat) for impl, run in runs.items()]
        if cell.one_thread:
            torch.set_num_threads(1)
        try:
            stats = run_interleaved(cases + ([] if cell.one_thread else probes.cases()), cell.rounds or cfg.rounds,
                                    cell.block or cfg.block, cfg.device, None if cell.rounds else cfg.cell_seconds,
                                    min_rounds=cell.rounds or min(cfg.rounds, 2))
        finally:
            torch.set_num_threads(threads)
        probes.record(stats)
        synchronize(cfg.device)
        reference = next((i for i in runs if i != cell.ours), None)
        expected = [t.detach() for t in runs[reference].outputs()] if reference and runs[reference].outputs else None
        for impl, run in runs.items():
            s, row = stats[impl], rows[impl]
            row.update(status="ok", ms_p50=s.q(0.5) * 1e3, ms_p20=s.q(0.2) * 1e3, ms_p80=s.q(0.8) * 1e3,
                       n_samples=len(s.samples), calls_per_sample=cell.repeat,
                       threads=1 if cell.one_thread else threads,
                       gbps=row["bytes_per_call"] / s.q(0.5) / 1e9 if row["bytes_per_call"] else None,
                       elements_per_ns=cell.numel / s.q(0.5) / 1e9)
            if run.extra is not None:
                row["extra"] = run.extra()
            if expected is not None and run.outputs is not None and impl != reference:
                got = [t.detach() for t in run.outputs()]
                diff = max((float((a.double() - b.double()).abs().max()) for a, b in zip(got, expected) if a.numel()),
                           default=0.0)
                close = len(got) == len(expected) and all(
                    torch.allclose(a.double(), b.double(), rtol=cell.tol[0], atol=cell.tol[1]) for a, b in zip(got, expected))
                row.update(check="ok" if close else "MISMATCH", check_against=reference, max_abs_diff=diff,
                           rtol=cell.tol[0], atol=cell.tol[1])
    busy = load.share()
    for row in rows.values():
        row["foreign_cpu_share"] = busy
    del runs
    if cfg.device.type == "cuda":
        torch.cuda.empty_cache()
    return list(rows.values())


def finish(rows: list[dict], probes: Probes) -> None:
    """Shares of the run's pooled bandwidth, and each row's ratio to its cell's own implementation."""
    ours = {(r["table"], r["op"], r["workload"]): r for r in rows if r["impl"] == r["ours"] and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        if r["bandwidth_probe"] and r["gbps"]:
            r["bandwidth_gbps"] = probes.gbps(r["bandwidth_probe"])
            r["share_of_bandwidth"] = r["gbps"] / r["bandwidth_gbps"]
        mine = ours.get((r["table"], r["op"], r["workload"]))
        if mine is not None and r is not mine:
            r["ours_speedup"] = r["ms_p50"] / mine["ms_p50"]  # this path's time / ours: > 1, ours is faster


# ----------------------------------------------------------------------------------------------
# Metadata and output


def _cpu() -> dict:
    info = {"model_name": platform.processor() or platform.machine()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (s.strip() for s in line.partition(":"))
            if key == "model name":
                info["model_name"] = value
            elif key == "flags":
                info["flags"] = [f for f in value.split() if f.startswith(("sse4", "avx", "fma", "f16c", "amx"))]
                break
        info["l3"] = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        pass
    return info


def _git() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "-uno"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine_info(device: torch.device) -> dict:
    """Machine, versions and settings, stored in every JSON row."""
    import pyfused
    from pyfused import _cpp

    info = {
        "host": socket.gethostname(), "cpu": _cpu(), "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
        "platform": platform.platform(), "torch": torch.__version__, "pyfused": pyfused.__version__,
        "pyfused_isa": _cpp.isa(), "git": _git(),
        "env": {k: os.environ[k] for k in ("PYFUSED_BACKEND", "PYFUSED_CPU_ISA", "OMP_NUM_THREADS") if k in os.environ},
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info["cuda"] = {"device": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
                        "memory_gib": round(p.total_memory / 2**30, 1), "torch_cuda": torch.version.cuda}
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def describe_machine(info: dict) -> str:
    cpu, git = info["cpu"], info["git"]
    lines = [f"machine: {cpu.get('model_name')} (L3 {cpu.get('l3', '?')}, {' '.join(cpu.get('flags', []))}), "
             f"{info['cpu_count']} CPUs ({info['cpu_affinity']} usable), torch threads {info['torch_threads']}",
             f"versions: torch {info['torch']}, pyfused {info['pyfused']} (ISA {info['pyfused_isa']}), python "
             f"{info['python']}, git {(git['commit'] or '?')[:10]}{' (dirty)' if git['dirty'] else ''}; "
             f"started {info['started']}"]
    if info["env"]:
        lines.append("env: " + " ".join(f"{k}={v}" for k, v in info["env"].items()))
    if "cuda" in info:
        c = info["cuda"]
        lines.append(f"gpu: {c['device']} (sm {c['capability']}, {c['memory_gib']} GiB, {c['sms']} SMs), "
                     f"CUDA {c['torch_cuda']}, triton {info.get('triton')}")
    return "\n".join(lines)


def write_rows(path: Path, rows: list[dict], meta: dict) -> None:
    """JSON lines: one object per measurement, probe and target, each with the machine."""
    def clean(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(path, "w") as f:
        for row in rows:
            row = {k: clean(v) for k, v in row.items()}
            f.write(json.dumps({**row, "time": now, "machine": meta}, default=str) + "\n")
