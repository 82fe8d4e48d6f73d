"""The Triton suite: compiled on a CUDA device when there is one, else under the interpreter.

Run it in its own pytest process (./dev test does): TRITON_INTERPRET must be set before triton
is imported, and the C++ suite must not run under it.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.fixture(autouse=True)
def _triton_backend():
    import pyfused

    with pyfused.use_backend("triton"):
        yield
