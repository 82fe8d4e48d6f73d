"""torch.nn counterparts: pyfused.nn.utils has the gradient-clipping functions, the batch norm
modules are drop-ins for torch.nn's (pyfused/nn/batchnorm.py)."""

from pyfused.nn import utils
from pyfused.nn.batchnorm import (
    BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormReLU1d, BatchNormReLU2d, BatchNormReLU3d, SyncBatchNorm,
)

__all__ = [
    "utils",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d",
    "SyncBatchNorm",
]
