"""torch.nn counterparts: pyfused.nn.utils has the gradient-clipping functions,
pyfused.nn.functional the fused functions (dropout), and the modules sit here."""

from pyfused.nn import functional, utils
from pyfused.nn.dropout import Dropout, Dropout1d, Dropout2d, Dropout3d

__all__ = ["Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "functional", "utils"]
