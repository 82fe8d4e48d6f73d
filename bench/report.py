"""The text the run prints and saves: the probes, one table per family table, the targets."""

from __future__ import annotations

import math

from .harness import NOISY_LOAD, Probes, Target


def table(headers: list[str], rows: list[list], groups: list[tuple[str, int]] | None = None) -> str:
    """A fixed-width table, numbers right-aligned; groups: (title, columns) printed above the headers."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    right = [any(isinstance(row[i], (int, float)) for row in rows) for i in range(len(headers))]
    out = []
    if groups:
        start = 0
        for title, span in groups:  # widen a group's first column where its title needs the room
            need = len(title) + 2 - (sum(widths[start:start + span]) + 2 * (span - 1))
            widths[start] += max(0, need) if title else 0
            start += span
        titles, start = [], 0
        for title, span in groups:
            width = sum(widths[start:start + span]) + 2 * (span - 1)
            titles.append(title.center(width, "-") if title else " " * width)
            start += span
        out.append("  ".join(titles).rstrip())

    def fmt(values):
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right)).rstrip()

    return "\n".join(out + [fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells])


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else \
            f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3f}"
    return str(value)


def probes_table(probes: Probes) -> str:
    rows = [[r["probe"], r["gbps"], f"{r['gbps_at_p80_time']:.1f}..{r['gbps_at_p20_time']:.1f}", r["what"],
             f"{r['buffer_mib']} MiB", r["n_samples"]] for r in probes.rows()]
    rows.append(["read", probes.gbps("read"), None, "the faster of the two reads", None, None])
    return table(["probe", "GB/s", "p80..p20", "counted", "buffer", "samples"], rows)


def _speedup(value) -> str | None:
    return f"{value:.2f}x" if value is not None and math.isfinite(value) else None


def results_table(group: list[dict]) -> str:
    """One row per (op, workload), the implementations side by side, ours first."""
    ours, one_thread, show = group[0]["ours"], group[0]["one_thread"], group[0]["show"]
    impls = sorted(dict.fromkeys(r["impl"] for r in group), key=lambda i: i != ours)
    bandwidth = any(r.get("gbps") for r in group)
    headers, groups = ["op", "workload"], [("", 2)]
    for impl in impls:
        cols = ["ms"]
        if impl == ours:
            cols += (["el/ns"] if one_thread else ["GB/s", "%bw"] if bandwidth else [])
        else:
            cols += ["el/ns"] if one_thread else []
            cols.append("x")
        cols += list(show)
        headers += cols
        groups.append((f" {impl} ", len(cols)))
    headers += ["noise", "load", "check"]
    groups.append(("", 3))
    index = {(r["op"], r["workload"], r["impl"]): r for r in group}
    rows = []
    for op, workload in dict.fromkeys((r["op"], r["workload"]) for r in group):
        row, spreads, checks, load = [op, workload], [], [], math.nan
        for impl in impls:
            r = index.get((op, workload, impl))
            ok = r is not None and r["status"] == "ok"
            if ok:
                spreads.append((r["ms_p80"] - r["ms_p20"]) / r["ms_p50"])
                checks.append(r.get("check"))
                load = r["foreign_cpu_share"]
            row.append(r["ms_p50"] if ok else "n/a")
            if impl == ours:
                if one_thread:
                    row.append(r["elements_per_ns"] if ok else None)
                elif bandwidth:
                    share = r.get("share_of_bandwidth") if ok else None
                    row += [r.get("gbps") if ok else None, f"{100 * share:.0f}%" if share is not None else None]
            else:
                if one_thread:
                    row.append(r["elements_per_ns"] if ok else None)
                row.append(_speedup(r.get("ours_speedup")) if ok else None)
            row += [(r.get("extra") or {}).get(key) if ok else None for key in show.values()]
        row += [f"{100 * max(spreads):.0f}%" if spreads else None,
                f"{100 * load:.0f}%" if math.isfinite(load) else None,
                "MISMATCH" if "MISMATCH" in checks else "ok" if "ok" in checks else None]
        rows.append(row)
    text = table(headers, rows, groups)
    descs = dict.fromkeys(f"{r['workload']} = {r['desc']}" for r in group)
    errors = dict.fromkeys(f"{r['impl']} n/a on {r['op']}: {r['error']}" for r in group if r["error"])
    return text + "\n  " + "; ".join(descs) + "".join(f"\n  {e}" for e in errors)


LEGEND = ("ms = median ms per call; GB/s = bytes counted / median time; %bw = GB/s as a share of the probe above "
          "(copy,\nor read for the norm); el/ns = elements per ns; x = that path's time / the first path's (its "
          "speedup); noise = largest\n(p80-p20)/median of the row; load = other processes' share of the CPUs; "
          "check = results agree with the second path's")


def results_tables(rows: list[dict]) -> str:
    measured = [r for r in rows if r["kind"] == "measurement"]
    titles = dict.fromkeys(r["table"] for r in measured)
    return "\n\n".join(f"{title}\n{results_table([r for r in measured if r['table'] == title])}" for title in titles)


def evaluate(targets: list[Target], rows: list[dict], device: str) -> list[dict]:
    """One row per target this run measured: PASS, FAIL, or N/A where a path did not run."""
    index = {(r["op"], r["workload"], r["impl"]): r for r in rows if r["kind"] == "measurement"}
    out = []
    for t in targets:
        mine = index.get((t.op, t.workload, t.impl))
        if t.device != device or mine is None:
            continue
        ok = mine["status"] == "ok"
        if t.kind == "speedup":
            base = next((index[k] for b in t.baselines if (k := (t.op, t.workload, b)) in index
                         and index[k]["status"] == "ok"), None)
            what = f"{t.impl} vs {base['impl'] if base else t.baselines[0]}"
            value = base["ms_p50"] / mine["ms_p50"] if ok and base else math.nan
            measured, need, passed = f"{value:.2f}x", f">= {t.threshold:.2f}x", value >= t.threshold
        elif t.kind == "share":
            what = f"{t.impl} share of {mine['bandwidth_probe']} bandwidth"
            value = mine.get("share_of_bandwidth", math.nan) if ok else math.nan
            measured, need, passed = f"{100 * value:.0f}%", f">= {100 * t.threshold:.0f}%", value >= t.threshold
        else:
            what = f"{t.impl} host cost per tensor"
            value = mine["ms_p50"] * 1e3 / mine["n_tensors"] if ok else math.nan
            measured, need, passed = f"{value:.2f} us", f"<= {t.threshold:.2f} us", value <= t.threshold
        status = "PASS" if passed else "FAIL" if math.isfinite(value) else "N/A"
        note = f"UNRELIABLE: other processes {100 * mine['foreign_cpu_share']:.0f}% of the CPUs" \
            if mine["foreign_cpu_share"] > NOISY_LOAD else ""
        out.append({"kind": "target", "source": t.source, "device": t.device, "op": t.op, "workload": t.workload,
                    "target": f"{t.op} {t.workload}: {what}", "measured": measured if status != "N/A" else "-",
                    "need": need, "status": status, "value": value, "threshold": t.threshold, "note": note})
    return out


def targets_table(verdicts: list[dict]) -> str:
    counts = " ".join(f"{n} {s}" for s in ("PASS", "FAIL", "N/A") if (n := sum(v["status"] == s for v in verdicts)))
    return table(["source", "target", "measured", "need", "result", "note"],
                 [[v["source"], v["target"], v["measured"], v["need"], v["status"], v["note"]] for v in verdicts]) \
        + f"\n{counts}"
