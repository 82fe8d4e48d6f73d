"""pyfused-bench: the whole run at --tiny sizes, and the harness's check and verdicts."""

import json
import math
import subprocess
import sys

import pytest
import torch

from pyfused.bench import harness, report

PNGS = ("speedup.png", "gbps_vs_size.png", "gbps_vs_count.png", "e2e_loss.png", "trajectories.png")


def test_tiny_run_end_to_end(tmp_path):
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (requirements-dev.txt)")
    # One thread: torch's OpenMP paths stall on a loaded 2-core CI machine, and the tiny sizes
    # check that everything runs, not how fast.
    done = subprocess.run([sys.executable, "-m", "pyfused.bench", "--tiny", "--threads", "1", "--strict",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "bench.jsonl").read_text().splitlines()]
    measured = [r for r in rows if r["kind"] == "measurement"]
    assert {r["family"] for r in measured} == {"optim", "clip", "dropout", "batchnorm", "averaging", "e2e"}
    assert {r["probe"] for r in rows if r["kind"] == "probe"} == {"copy", "read-sum", "read-dot"}
    ours = [r for r in measured if r["impl"] == r["ours"]]
    assert ours and all(r["status"] == "ok" for r in ours), [r["error"] for r in ours if r["status"] != "ok"]
    checks = [r["check"] for r in measured if "check" in r]  # every path but each cell's reference
    assert len(checks) > len(measured) / 2 and set(checks) == {"ok"}
    assert all(r["machine"]["git"] and r["machine"]["torch"] == torch.__version__ for r in rows)
    text = (tmp_path / "bench.txt").read_text()
    for title in ("optimizer step, fp32", "global 2-norm, one thread, in cache", "clip_grad_norm_ + AdamW step",
                  "dropout p=0.5, fp32, forward + backward", "BatchNorm + ReLU, training forward + backward, fp32"):
        assert title in text
    for name in PNGS:
        assert (tmp_path / name).stat().st_size > 10_000, name


def test_check_flags_a_path_that_computes_something_else():
    cfg = harness.Config.make("tiny", torch.device("cpu"))
    x = torch.ones(64)

    def setup():
        return {"pyfused": lambda: harness.Run(lambda: None, outputs=lambda: [x * (1 + 1e-3)]),
                "torch": lambda: harness.Run(lambda: None, outputs=lambda: [x]),
                "torch-close": lambda: harness.Run(lambda: None, outputs=lambda: [x * (1 + 1e-6)])}

    cell = harness.Cell("t", "t", "op", "w", "w", 1, 64, 256, setup, tol=(1e-5, 0.0), one_thread=True)
    rows = {r["impl"]: r for r in harness.measure(cell, cfg, harness.Probes(cfg.device, 0))}
    assert rows["pyfused"]["check"] == "MISMATCH" and rows["pyfused"]["max_abs_diff"] == pytest.approx(1e-3, rel=1e-4)
    assert rows["torch-close"]["check"] == "ok"
    assert "check" not in rows["torch"]  # the reference


def test_targets_pass_fail_and_fallback():
    def row(impl, ms, workload="large", **more):
        return {"kind": "measurement", "op": "Adam", "workload": workload, "impl": impl, "status": "ok",
                "ms_p50": ms, "foreign_cpu_share": 0.0, "n_tensors": 2000, **more}

    rows = [row("pyfused", 1.0), row("torch-foreach", 1.5), row("pyfused", 1.0, "small"),
            {**row("torch-fused", math.nan, "small"), "status": "n/a"}, row("torch-foreach", 9.0, "small"),
            row("pyfused", 4.0, "host")]
    targets = [harness.Target("i", "cpu", "Adam", "large", "speedup", 1.2, ("torch-fused", "torch-foreach")),
               harness.Target("i", "cpu", "Adam", "small", "speedup", 8.0, ("torch-fused", "torch-foreach")),
               harness.Target("i", "cpu", "Adam", "host", "us_per_tensor", 1.0),
               harness.Target("i", "cuda", "Adam", "large", "share", 0.85)]
    verdicts = report.evaluate(targets, rows, "cpu")
    assert [(v["status"], v["measured"]) for v in verdicts] == [("PASS", "1.50x"), ("PASS", "9.00x"),
                                                                ("FAIL", "2.00 us")]
    assert "torch-foreach" in verdicts[1]["target"]  # no fused path measured: the fallback
