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

    def _new_state(self, param, group, state):
        new = {} if "step" in state else {"step": self._new_step(param, group)}
        for key in self._state_keys(group):
            if key not in state:
                new[key] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return new, 0

    def _hyper(self, group):
        return (group["lr"], group["rho"], group["eps"], group["weight_decay"], group["maximize"])
