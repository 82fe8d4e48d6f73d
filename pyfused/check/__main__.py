"""pyfused-check: the parity table on every backend this machine has (see pyfused/check/__init__.py)."""

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import sys
import time

import torch

from pyfused import check

COLUMNS = ("family", "backend", "case", "dtype", "max abs", "max rel", "rtol", "atol", "err/tol", "status")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="pyfused-check",
        description="Compare pyfused's kernels with torch's reference implementations, case by case. "
                    "Exits 1 if any case is out of tolerance.",
    )
    parser.add_argument("--quick", action="store_true", help="a subset of the cases and steps (under a minute on 2 cores)")
    parser.add_argument("--backend", help="comma-separated: cpp, triton (default: every backend this machine has)")
    parser.add_argument("--only", help=f"comma-separated families: {', '.join(check.FAMILIES)} (default: all)")
    parser.add_argument("--json", metavar="PATH", help="also write the report, with the machine and versions, as JSON")
    args = parser.parse_args(argv)
    available = check.available_backends()
    args.backends = _choice(parser, "--backend", args.backend, ("cpp", "triton"), available)
    missing = [b for b in args.backends if b not in available]
    if missing:
        parser.error(
            "the triton backend needs triton and a CUDA GPU (or TRITON_INTERPRET=1 set before start, "
            f"to run it on CPU tensors); this machine has: {', '.join(available)}"
        )
    args.families = _choice(parser, "--only", args.only, tuple(check.FAMILIES), tuple(check.FAMILIES))
    return args


def _choice(parser, flag, value, allowed, default):
    if value is None:
        return list(default)
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        parser.error(f"{flag} takes {', '.join(allowed)}; got {value!r}")
    return names


def _number(x):
    return "-" if x is None else f"{x:.2e}"


def _cells(r):
    return (r.family, r.backend, r.case, r.dtype, _number(r.max_abs), _number(r.max_rel), _number(r.rtol),
            _number(r.atol), "-" if r.err_over_tol is None else f"{r.err_over_tol:.3f}", r.status)


WIDTHS = (9, 7, 38, 10, 9, 9, 9, 9, 8, 6)


def _line(cells):
    return "  ".join(str(c).ljust(w) for c, w in zip(cells, WIDTHS)).rstrip()


def machine():
    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "pyfused": _version("pyfused"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    from pyfused import _cpp

    info["cpu_isa"] = _cpp.isa()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _json_number(x):
    """Strict JSON has no inf or NaN: they are written as strings."""
    return str(x) if isinstance(x, float) and not math.isfinite(x) else x


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    perturb = os.environ.get("PYFUSED_CHECK_PERTURB")  # test-only: see check._perturbed
    info = machine()
    print(f"pyfused-check: backends {', '.join(args.backends)}; torch {info['torch']}, triton {info['triton']}, "
          f"{info['torch_threads']} threads, CPU ISA {info['cpu_isa']}" + (f", {info['gpu']}" if "gpu" in info else ""))
    if perturb:
        print(f"PYFUSED_CHECK_PERTURB={perturb}: the kernels' results are deliberately perturbed (a test of the checker)")
    print(_line(COLUMNS))
    start = time.perf_counter()
    results = []
    with check._perturbed(float(perturb)) if perturb else contextlib.nullcontext():
        for family in args.families:
            for backend in args.backends:
                for item in check.family_checks(family, backend, args.quick):
                    result = check.run_check(family, backend, item)
                    results.append(result)
                    print(_line(_cells(result)) + (f"  {result.note}" if result.status not in ("PASS", "XPASS") else ""),
                          flush=True)
    failed = [r for r in results if r.status not in check.PASSING]
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "ERROR", "XFAIL", "XPASS", "SKIP")}
    seconds = time.perf_counter() - start
    print(f"\n{len(results)} cases in {seconds:.1f} s: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
          + (" -- XFAIL/SKIP rows are known, documented differences" if counts["XFAIL"] + counts["SKIP"] else ""))
    if failed:
        print(f"FAILED: {len(failed)} case(s) out of tolerance or broken:")
        for r in failed:
            print(f"  {r.family} {r.backend} {r.case} {r.dtype}: {r.status} {r.note}")
    if args.json:
        report = {
            "tool": "pyfused-check",
            "argv": sys.argv[1:] if argv is None else list(argv),
            "quick": args.quick,
            "backends": args.backends,
            "families": args.families,
            "perturbed": perturb,
            "machine": info,
            "seconds": seconds,
            "summary": counts,
            "passed": not failed,
            "results": [{k: _json_number(v) for k, v in vars(r).items()} for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
