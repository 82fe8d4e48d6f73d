"""The Triton suite. Run it in its own pytest process (./dev test does): TRITON_INTERPRET must be
set before triton is imported, and the C++ suite must not run under it."""

import pytest

from triton_suite import DEVICE, INTERPRETED  # noqa: F401  (sets TRITON_INTERPRET first)

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")


@pytest.fixture(autouse=True)
def _triton_backend():
    import pyfused

    with pyfused.use_backend("triton"):
        yield
