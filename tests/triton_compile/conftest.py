"""Compile-only checks of the Triton kernels for a CUDA target. They need triton, not a GPU, and
must run in a process without TRITON_INTERPRET (./dev test runs them on their own)."""

import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compile-only tests need TRITON_INTERPRET unset", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed (pip install triton)")
