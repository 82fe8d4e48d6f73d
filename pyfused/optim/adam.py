import torch

from pyfused.optim._fused import FusedOptimizer


class Adam(FusedOptimizer, torch.optim.Adam):
    """torch.optim.Adam, with each param group's step fused into one kernel call.

    Arguments, defaults and errors are torch.optim.Adam's; state_dicts move freely between the
    two. ``foreach`` and ``fused`` are accepted and have no effect; ``differentiable=True`` is
    refused. The math follows torch's for-loop implementation: see Adam in csrc/optimizers.h.
    """

    _kernel = "adam"
    _torch_class = torch.optim.Adam

    def _state_keys(self, group):
        if group["amsgrad"]:
            return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
        return ("exp_avg", "exp_avg_sq")

    def _hyper(self, group):
        beta1, beta2 = group["betas"]
        return (
            group["lr"], beta1, beta2, group["eps"], group["weight_decay"],
            group["amsgrad"], group["maximize"], group["decoupled_weight_decay"],
        )
