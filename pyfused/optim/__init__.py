"""Drop-in replacements for torch.optim's SGD, Adagrad, RMSprop, Adam, AdamW and Adadelta."""

from pyfused.optim.adadelta import Adadelta
from pyfused.optim.adagrad import Adagrad
from pyfused.optim.adam import Adam
from pyfused.optim.adamw import AdamW
from pyfused.optim.rmsprop import RMSprop
from pyfused.optim.sgd import SGD

__all__ = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Adadelta"]
