import pytest


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    """Tests choose their backend themselves; a PYFUSED_BACKEND from the caller's shell would
    turn the parity tests into torch-against-torch."""
    monkeypatch.delenv("PYFUSED_BACKEND", raising=False)
