import torch

from pyfused.optim._fused import FusedOptimizer

_FRESH_BUFFER = 1  # csrc/optimizers.h Sgd::kFreshBuffer: the buffer starts as a copy of the grad


class SGD(FusedOptimizer, torch.optim.SGD):
    """torch.optim.SGD (momentum, dampening, Nesterov), with each param group's step fused
    into one kernel call.

    Arguments, defaults and errors are torch.optim.SGD's; state_dicts move freely between the
    two. Sparse gradients and ``differentiable=True`` are refused. The math: Sgd in
    csrc/optimizers.h.
    """

    _kernel = "sgd"
    _torch_class = torch.optim.SGD
    _counts_steps = False
    _views_complex_grads = False  # torch's SGD reads a complex grad as it is

    def _state_keys(self, group):
        return ("momentum_buffer",) if group["momentum"] != 0 else ()

    def _new_state(self, param, group, state):
        if group["momentum"] != 0 and state.get("momentum_buffer") is None:
            # Zeros only for tidiness: the kernel replaces a fresh buffer by the grad, ignoring its values.
            return {"momentum_buffer": torch.zeros_like(param, memory_format=torch.preserve_format)}, _FRESH_BUFFER
        return {}, 0

    def _hyper(self, group):
        return (
            group["lr"], group["momentum"], group["dampening"], group["weight_decay"],
            group["nesterov"], group["maximize"],
        )
