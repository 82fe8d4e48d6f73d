"""Drop-in replacements for torch.optim's SGD, Adagrad, RMSprop, Adam, AdamW and Adadelta, and for
torch.optim.swa_utils (weight averaging)."""

from pyfused.optim.adadelta import Adadelta
from pyfused.optim.adagrad import Adagrad
from pyfused.optim.adam import Adam
from pyfused.optim.adamw import AdamW
from pyfused.optim.rmsprop import RMSprop
from pyfused.optim.sgd import SGD
from pyfused.optim import swa_utils  # AveragedModel, get_ema_multi_avg_fn, ... as torch.optim.swa_utils

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adadelta"]
