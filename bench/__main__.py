"""pyfused-bench: pyfused against torch, family by family, with the machine's bandwidth beside it.

    pyfused-bench                      # --quick: every family, a few minutes on 2 cores
    pyfused-bench --full               # the sweeps, more rounds
    pyfused-bench --only optim,clip --device cuda --out DIR

Writes DIR/bench.jsonl (one JSON row per measurement, probe and target, each with the machine),
DIR/bench.txt (the tables printed at the end) and DIR/*.png.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import sys
import time
from pathlib import Path

import torch

from . import FAMILIES, harness, plots, report


def default_out() -> Path:
    """bench/results/<UTC time> in a source checkout (git-ignored), else ./pyfused-bench-results/<UTC time>."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    here = Path(__file__).resolve().parent
    base = here / "results" if (here.parent / "setup.py").exists() else Path.cwd() / "pyfused-bench-results"
    return base / stamp


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="pyfused-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick", help="the default")
    mode.add_argument("--full", dest="mode", action="store_const", const="full", help="sweeps, more rounds")
    mode.add_argument("--tiny", dest="mode", action="store_const", const="tiny",
                      help="a few tiny tensors, one round: checks that every path runs (the test suite's)")
    p.set_defaults(mode="quick")
    p.add_argument("--only", default=",".join(FAMILIES), help=f"comma-separated, from {','.join(FAMILIES)}")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--out", type=Path, default=None, help="output folder (default: bench/results/<UTC time>)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--strict", action="store_true", help="exit 1 if a target FAILs or results disagree")
    args = p.parse_args(argv)
    args.only = [x.strip() for x in args.only.split(",") if x.strip()]
    if unknown := [x for x in args.only if x not in FAMILIES]:
        p.error(f"--only: unknown {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error(f"--device cuda: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False)")
    return args


def progress(total: int):
    """tqdm's bar on stderr; without tqdm, one line per cell."""
    try:
        from tqdm import tqdm
    except ImportError:
        class Lines:
            n = 0

            def set_description_str(self, text):
                self.n += 1
                print(f"[{self.n}/{total}] {text}", file=sys.stderr, flush=True)

            def update(self, _n=1):
                pass

            def close(self):
                pass

        return Lines()
    return tqdm(total=total, unit="cell", file=sys.stderr, dynamic_ncols=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = harness.Config.make(args.mode, device)
    out = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    families = {name: importlib.import_module(f"{__package__}.{FAMILIES[name]}") for name in args.only}
    cells = [c for m in families.values() for c in (m.cells(cfg) if hasattr(m, "cells") else [])]
    meta = harness.machine_info(device)
    print(harness.describe_machine(meta), flush=True)

    started, load = time.perf_counter(), harness.ForeignLoad()
    probes = harness.Probes(device, cfg.probe_mib if cells else 0)
    gc.freeze()  # what is alive now lives all run: each cell's gc.collect() then skips it
    rows, bar = [], progress(len(cells))
    for cell in cells:
        bar.set_description_str(f"{cell.family} {cell.op} {cell.workload}")
        rows += harness.measure(cell, cfg, probes)
        bar.update(1)
    bar.close()
    harness.finish(rows, probes)
    pngs = plots.draw(rows, probes, device.type, out) if rows else []
    for m in families.values():
        if hasattr(m, "after"):
            pngs += m.after(cfg, rows, out)
    seconds, busy = time.perf_counter() - started, load.share()

    targets = [t for m in families.values() for t in getattr(m, "TARGETS", [])]
    verdicts = report.evaluate(targets, rows, device.type) if args.mode != "tiny" else []
    text = [f"pyfused-bench --{args.mode} --device {device.type} --only {','.join(args.only)}: {len(cells)} cells "
            f"in {seconds:.0f} s; other processes took {100 * busy:.0f}% of the {meta['cpu_count']} CPUs meanwhile",
            harness.describe_machine(meta)]
    if rows:
        text += [f"bandwidth probes ({device.type}), beside every cell, pooled over the run:",
                 report.probes_table(probes), report.LEGEND, report.results_tables(rows)]
    if verdicts:
        text += ["targets:", report.targets_table(verdicts)]
    elif args.mode == "tiny":
        text.append("targets: not judged at --tiny sizes")
    mismatches = [r for r in rows if r.get("check") == "MISMATCH"]
    text += [f"WARNING: {r['op']} {r['workload']} {r['impl']}: results differ from {r['check_against']}'s by up to "
             f"{r['max_abs_diff']:.2e} (rtol {r['rtol']:g}, atol {r['atol']:g})" for r in mismatches]
    if not pngs and plots.pyplot() is None:
        text.append("plots: none (matplotlib is not installed)")
    text.append(f"output: {out}: bench.jsonl, bench.txt{''.join(', ' + p.name for p in pngs)}")
    text = "\n\n".join(text)
    print("\n" + text)
    (out / "bench.txt").write_text(text + "\n")
    harness.write_rows(out / "bench.jsonl", (probes.rows() if rows else []) + rows + verdicts, meta)
    failed = mismatches or any(v["status"] == "FAIL" for v in verdicts)
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
