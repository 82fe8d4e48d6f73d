"""./dev gpu on a machine without CUDA: it says so and exits non-zero, before building anything."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: ./dev gpu would run for real")
def test_dev_gpu_without_cuda_says_so(tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run([str(ROOT / "dev"), "gpu", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "no CUDA here" in done.stderr
    assert f"{sys.executable}: torch {torch.__version__}, CUDA {torch.version.cuda}, GPU visible: False" in done.stderr
    assert not out.exists()  # nothing built, nothing written
