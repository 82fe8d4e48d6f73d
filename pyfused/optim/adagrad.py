import torch

from pyfused.optim._fused import FusedOptimizer


class Adagrad(FusedOptimizer, torch.optim.Adagrad):
    """torch.optim.Adagrad, with each param group's step fused into one kernel call.

    Arguments, defaults and errors are torch.optim.Adagrad's (which creates the state when it is
    constructed); state_dicts move freely between the two. Sparse gradients and
    ``differentiable=True`` are refused. The math: Adagrad in csrc/optimizers.h.
    """

    _kernel = "adagrad"
    _torch_class = torch.optim.Adagrad

    def _state_keys(self, group):
        return ("sum",)

    def _new_state(self, param, group, state):
        # torch creates this state in __init__; here only for params added or reset since.
        new = {} if "step" in state else {"step": self._new_step(param, group)}
        if "sum" not in state:
            value = group["initial_accumulator_value"]
            value = complex(value, value) if param.is_complex() else value
            new["sum"] = torch.full_like(param, value, memory_format=torch.preserve_format)
        return new, 0

    def _hyper(self, group):
        return (group["lr"], group["lr_decay"], group["weight_decay"], group["eps"], group["maximize"])
