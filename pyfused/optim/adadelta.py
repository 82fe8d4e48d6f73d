import torch

from pyfused.optim._fused import FusedOptimizer


class Adadelta(FusedOptimizer, torch.optim.Adadelta):
    """torch.optim.Adadelta, with each param group's step fused into one kernel call.

    Arguments, defaults and errors are torch.optim.Adadelta's; state_dicts move freely between
    the two. ``foreach`` is accepted and has no effect; sparse gradients and
    ``differentiable=True`` are refused. The math: Adadelta in
    csrc/optimizers.h.
    """

    _kernel = "adadelta"
    _torch_class = torch.optim.Adadelta

    def _state_keys(self, group):
        return ("square_avg", "acc_delta")

    def _hyper(self, group):
        return (group["lr"], group["rho"], group["eps"], group["weight_decay"], group["maximize"])
