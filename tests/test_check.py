"""pyfused-check: the report, the exit status, and that it fails when a kernel is wrong (through
the test-only hook pyfused.check._perturbed, PYFUSED_CHECK_PERTURB on the command line)."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from pyfused import check
from pyfused.check import __main__ as cli
from pyfused.check import clip_cases

# A relative error of 1e-3 in every update (or norm): 100 fp32 ulps, a quarter of a bf16 ulp.
PERTURB = 1e-3


def run_cli(*args, perturb=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYFUSED_BACKEND", "PYFUSED_CHECK_PERTURB", "TRITON_INTERPRET")}
    if perturb is not None:
        env["PYFUSED_CHECK_PERTURB"] = str(perturb)
    return subprocess.run([sys.executable, "-m", "pyfused.check", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_cli_passes_then_fails_when_the_kernels_are_perturbed(tmp_path):
    report = tmp_path / "report.json"
    good = run_cli("--quick", "--only", "clip", "--backend", "cpp", "--json", str(report))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "max abs" in good.stdout and "err/tol" in good.stdout
    data = json.loads(report.read_text())
    assert data["passed"] and data["machine"]["torch"] == torch.__version__ and data["machine"]["cpu_isa"]
    rows = data["results"]
    assert {r["case"] for r in rows} >= {"norm-one", "norm-300", "fused-Adam"}
    assert all(r["status"] == "PASS" and r["family"] == "clip" and r["backend"] == "cpp" for r in rows)
    assert all(0 <= r["err_over_tol"] <= 1 for r in rows)

    bad = run_cli("--quick", "--only", "clip", "--backend", "cpp", "--json", str(report), perturb=PERTURB)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAILED" in bad.stdout
    data = json.loads(report.read_text())
    assert not data["passed"] and data["perturbed"] == str(PERTURB)
    failed = {(r["case"], r["dtype"]) for r in data["results"] if r["status"] == "FAIL"}
    # The fp32 and fp64 norms (max and min must be exact); fused clipping is held to torch's
    # norm error (5e-4), which this perturbation stays under: see the test below.
    assert {(f"norm-{s}", d) for s in ("one", "three", "chunk_edges", "300") for d in ("fp32", "fp64")} <= failed
    assert all(r["err_over_tol"] == "inf" or r["err_over_tol"] > 1 for r in data["results"] if r["status"] == "FAIL")


# 16-bit: at lr 1e-3 (the tables' value) an update is below half an ulp of a bf16 or fp16 param
# for most elements, so a 1e-3 error in lr moves almost no rounding; a 3% error moves enough of
# them past the share of elements that may differ (2%). fp32 cases catch 1e-3.
PERTURB_16BIT = 3e-2
OPTIM_CASES = [("SGD-nesterov_wd_maximize", "fp32"), ("Adagrad-plain", "fp32"), ("RMSprop-all", "fp32"),
               ("Adam-amsgrad_wd_maximize", "fp32"), ("Adam-plain", "bf16"), ("Adam-plain", "fp16")]


def optim_checks(wanted, quick=True):
    checks = {(c.case, c.dtype): c for c in check.family_checks("optim", "cpp", quick)}
    return [checks[w] for w in wanted]


@pytest.mark.parametrize("item", optim_checks(OPTIM_CASES), ids=lambda c: f"{c.case}-{c.dtype}")
def test_optimizer_cases_fail_when_perturbed(item):
    result = check.run_check("optim", "cpp", item)
    assert result.status == "PASS", result.note
    assert 0 <= result.err_over_tol <= 1 and result.rtol is not None
    with check._perturbed(PERTURB_16BIT if item.dtype in ("bf16", "fp16") else PERTURB):
        result = check.run_check("optim", "cpp", item)
    assert result.status == "FAIL", result
    assert "not close" in result.note or "differ from the reference" in result.note


def test_fused_clipping_fails_when_perturbed():
    """Its tolerance is torch's norm error (5e-4 relative), so it takes a larger perturbation."""
    checks = {c.case: c for c in check.family_checks("clip", "cpp", quick=True) if c.case.startswith("fused-")}
    assert set(checks) == {f"fused-{name}" for name in clip_cases.FUSED}
    for item in checks.values():
        assert check.run_check("clip", "cpp", item).status == "PASS"
        with check._perturbed(0.05):
            result = check.run_check("clip", "cpp", item)
        assert result.status == "FAIL" and result.err_over_tol > 1, result


def test_dropout_and_batchnorm_fail_when_perturbed():
    """Every dropout comparison of values is exact, so any error in the scale fails it (err/tol
    inf); the dropped fraction and the determinism cases look at the masks, which this hook leaves
    alone. Batch norm: a 1e-3 error in the statistics is 100x the fp32 tolerance (1e-5) but below
    the 16-bit ones (2 ulps), so the fp32 and fp64 cases must fail."""
    items = {family: list(check.family_checks(family, "cpp", quick=True)) for family in ("dropout", "batchnorm")}
    for family, checks in items.items():
        results = [check.run_check(family, "cpp", item) for item in checks]
        assert all(r.status == "PASS" and 0 <= r.err_over_tol <= 1 for r in results), [r for r in results if r.status != "PASS"]
    with check._perturbed(PERTURB):
        dropout = [check.run_check("dropout", "cpp", item) for item in items["dropout"]]
        batchnorm = [check.run_check("batchnorm", "cpp", item) for item in items["batchnorm"]
                     if item.dtype in ("fp32", "fp64")]
    masks_only = [r for r in dropout if r.case.startswith("fraction-") or r.case == "seeded"]
    assert len(masks_only) == 4 and all(r.status == "PASS" for r in masks_only)
    values = [r for r in dropout if r not in masks_only]
    assert {r.case for r in values} == {"mask", "backward", "dropout_add", "dropout2d"}
    assert all(r.status == "FAIL" and math.isinf(r.err_over_tol) for r in values), [r for r in values if r.status != "FAIL"]
    assert len(batchnorm) > 40 and all(r.status == "FAIL" and r.err_over_tol > 1 for r in batchnorm), [
        r for r in batchnorm if r.status != "FAIL"]


def test_known_issues_are_reported_with_their_reason():
    tensor_lr, sqrt_ulp = optim_checks([("Adam-tensor_lr", "fp64"), ("RMSprop-maximize_weight_decay", "complex64")],
                                       quick=False)
    result = check.run_check("optim", "cpp", tensor_lr)
    assert result.status == "XFAIL" and "double" in result.note
    result = check.run_check("optim", "cpp", sqrt_ulp)
    assert result.status == "XFAIL" and "sqrt" in result.note


def test_a_crash_is_an_error_not_a_pass():
    def broken(errors):
        raise RuntimeError("kernel exploded")

    result = check.run_check("optim", "cpp", check.Check("broken", "fp32", broken))
    assert result.status == "ERROR" and result.note == "RuntimeError: kernel exploded"
    assert "ERROR" not in check.PASSING


def test_errors_record_the_worst_element():
    errors = check.Errors()
    expected = torch.tensor([1.0, -2.0, 0.0, math.inf, math.nan, 4.0])
    actual = torch.tensor([1.0, -2.5, 1e-6, math.inf, math.nan, 4.0])
    errors.record(actual, expected, 1e-3, 1e-5)
    assert errors.max_abs == 0.5 and errors.max_rel == pytest.approx(0.25)
    assert errors.worst == pytest.approx(0.5 / (1e-5 + 2e-3))
    errors.record(torch.tensor([math.nan]), torch.tensor([1.0]), 0.1, 0.1)  # NaN where torch is finite
    assert math.isinf(errors.worst) and (errors.rtol, errors.atol) == (0.1, 0.1)
    empty = check.Errors()
    empty.record(torch.empty(0, dtype=torch.bfloat16), torch.empty(0), 0.0, 0.0)
    assert (empty.max_abs, empty.worst, empty.rtol) == (0.0, 0.0, 0.0)


def test_arguments(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--only", "optim,nope"])
    assert exit_.value.code == 2 and "--only takes optim, clip, dropout, batchnorm" in capsys.readouterr().err
    if torch.cuda.is_available():
        pytest.skip("the triton backend is available on this machine (CUDA)")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--backend", "triton"])
    assert exit_.value.code == 2 and "needs triton and a CUDA GPU" in capsys.readouterr().err
    assert check.available_backends() == ["cpp"]
