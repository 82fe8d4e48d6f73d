"""torch.nn counterparts: pyfused.nn.utils has the gradient-clipping functions."""

from pyfused.nn import utils

__all__ = ["utils"]
