"""gradwise optimizers: ``torch.optim.Optimizer`` subclasses, one file per family."""

from gradwise.optim.adagrad import Adagrad
from gradwise.optim.adam import Adam, AdamW
from gradwise.optim.base import GradwiseOptimizer
from gradwise.optim.lion import Lion
from gradwise.optim.nadam import NAdam
from gradwise.optim.param_groups import weight_decay_groups
from gradwise.optim.rmsprop import RMSprop
from gradwise.optim.sgd import SGD

__all__ = [
    "SGD",
    "Adagrad",
    "Adam",
    "AdamW",
    "GradwiseOptimizer",
    "Lion",
    "NAdam",
    "RMSprop",
    "weight_decay_groups",
]
