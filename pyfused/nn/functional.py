"""torch.nn.functional counterparts: pyfused's fused functions."""

from pyfused.nn.dropout import dropout, dropout1d, dropout2d, dropout3d, dropout_add

__all__ = ["dropout", "dropout1d", "dropout2d", "dropout3d", "dropout_add"]
