"""pyfused's benchmarks: `pyfused-bench` (or `python -m pyfused.bench`); see bench/README.md.

FAMILIES is the registry: a name for --only, and the module under pyfused.bench that measures it.
A timed family's module has `cells(cfg)` (a list of harness.Cell) and may have `TARGETS` (a list
of harness.Target); any family may have `after(cfg, rows, out)`, which draws its own PNG files
from the run's rows and returns their paths.
"""

FAMILIES = {
    "optim": "optim",  # pyfused.optim vs torch.optim's for-loop, foreach, fused
    "clip": "clip",  # global norm, clip + AdamW
    "dropout": "dropout",  # F.dropout, dropout_add vs torch
    "batchnorm": "batchnorm",  # BatchNorm, BatchNormReLU vs torch
    "averaging": "averaging",  # AveragedModel.update_parameters (EMA) vs torch's
    "e2e": "e2e",  # small CNN and MLP trained with torch's vs pyfused's components
    "trajectories": "trajectories",  # the optimizers' paths on 2-D test functions (a picture, untimed)
}
