import torch

from pyfused.optim._fused import FusedOptimizer


class RMSprop(FusedOptimizer, torch.optim.RMSprop):
    """torch.optim.RMSprop (momentum, centered), with each param group's step fused into one
    kernel call.

    Arguments, defaults and errors are torch.optim.RMSprop's; state_dicts move freely between
    the two. ``differentiable=True`` is refused. The math: Rmsprop in csrc/optimizers.h.
    """

    _kernel = "rmsprop"
    _torch_class = torch.optim.RMSprop

    def _state_keys(self, group):
        # Role order of the kernel: square_avg, then momentum_buffer, then grad_avg.
        keys = ("square_avg",)
        if group["momentum"] > 0:
            keys += ("momentum_buffer",)
        if group["centered"]:
            keys += ("grad_avg",)
        return keys

    def _hyper(self, group):
        return (
            group["lr"], group["alpha"], group["eps"], group["weight_decay"], group["momentum"],
            group["centered"], group["maximize"],
        )
