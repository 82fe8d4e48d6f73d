import torch

from pyfused.optim.adam import Adam


class AdamW(Adam, torch.optim.AdamW):
    """torch.optim.AdamW, with each param group's step fused into one kernel call.

    As in torch, AdamW is Adam with decoupled weight decay (and a default weight_decay of 1e-2).
    """

    _torch_class = torch.optim.AdamW
