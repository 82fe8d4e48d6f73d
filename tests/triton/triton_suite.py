"""Where the Triton suite runs: compiled on a CUDA device when there is one, else under the
interpreter on CPU tensors. Imported by conftest.py before anything imports triton."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
