"""pyfused: fused multi-tensor optimizer updates for PyTorch.

``pyfused.optim.Adam`` and friends are drop-in replacements for ``torch.optim``'s classes. Each
step updates all tensors of a param group in one call: C++ kernels on CPU tensors, Triton
kernels on CUDA tensors. ``use_backend`` (or ``PYFUSED_BACKEND``) forces one backend.
"""

from pyfused._backend import BACKENDS, use_backend
from pyfused import nn, optim

__version__ = "0.1.0"
__all__ = ["BACKENDS", "nn", "optim", "use_backend"]
