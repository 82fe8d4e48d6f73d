"""Which implementation runs a step: chosen by the tensors' device unless forced.

Forcing takes ``use_backend(name)`` (a context manager, per thread and task) or, outside one,
the environment variable ``PYFUSED_BACKEND``:
  cpp     the C++ kernels (CPU tensors);
  triton  the Triton kernels (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1);
  torch   torch's own for-loop implementation, the reference pyfused is tested against.
"""

import contextlib
import contextvars
import os

import torch

BACKENDS = ("cpp", "triton", "torch")

_forced = contextvars.ContextVar("pyfused_backend", default=None)


def _checked(name, source):
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}; got {name!r}")
    return name


@contextlib.contextmanager
def use_backend(name):
    """Runs the steps inside the block with the named backend ("cpp", "triton" or "torch")."""
    token = _forced.set(_checked(name, "pyfused.use_backend's name"))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend():
    """The backend forced by use_backend or PYFUSED_BACKEND, or None."""
    name = _forced.get()
    if name is not None:
        return name
    name = os.environ.get("PYFUSED_BACKEND")
    return _checked(name, "PYFUSED_BACKEND") if name else None


def backend_for(device: torch.device) -> str:
    forced = forced_backend()
    if forced is not None:
        if forced == "cpp" and device.type != "cpu":
            raise RuntimeError(f"pyfused's cpp backend runs on CPU tensors; these are on {device}")
        if forced == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"pyfused's triton backend runs on CUDA tensors; these are on {device} "
                "(CPU tensors run under the Triton interpreter: set TRITON_INTERPRET=1 before start)"
            )
        return forced
    if device.type == "cpu":
        return "cpp"
    if device.type == "cuda":
        return "triton"
    return "torch"  # devices pyfused has no kernels for keep torch's implementation
