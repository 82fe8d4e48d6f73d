"""torch.nn counterparts: pyfused.nn.utils has the gradient-clipping functions,
pyfused.nn.functional the fused functions (dropout), and the modules (dropout, batch norm) sit
here as drop-ins for torch.nn's."""

from pyfused.nn import functional, utils
from pyfused.nn.batchnorm import (
    BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d, SyncBatchNorm,
)
from pyfused.nn.dropout import Dropout, Dropout1d, Dropout2d, Dropout3d

__all__ = [
    "functional", "utils",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d",
    "SyncBatchNorm",
    "Dropout", "Dropout1d", "Dropout2d", "Dropout3d",
]
