"""gradwise optimizers: ``torch.optim.Optimizer`` subclasses, one file per family."""

from gradwise.optim.adafactor import Adafactor
from gradwise.optim.adagrad import Adagrad
from gradwise.optim.adam import Adam, AdamW
from gradwise.optim.ademamix import AdEMAMix
from gradwise.optim.base import GradwiseOptimizer
from gradwise.optim.dynamic_sampling import GeometricBatchSize
from gradwise.optim.kfac import KFAC
from gradwise.optim.lbfgs import LBFGS
from gradwise.optim.lion import Lion
from gradwise.optim.muon import Muon, muon_param_groups
from gradwise.optim.nadam import NAdam
from gradwise.optim.newton import Newton, NewtonCG
from gradwise.optim.param_groups import weight_decay_groups
from gradwise.optim.psgd_kron import PSGDKron
from gradwise.optim.rmsprop import RMSprop
from gradwise.optim.saga import SAGA
from gradwise.optim.schedule_free import ScheduleFreeAdamW, ScheduleFreeSGD
from gradwise.optim.sgd import SGD
from gradwise.optim.shampoo import Shampoo
from gradwise.optim.soap import SOAP
from gradwise.optim.sophia import Sophia
from gradwise.optim.sqn import SQN
from gradwise.optim.svrg import SVRG

__all__ = [
    "KFAC",
    "SGD",
    "SOAP",
    "Adafactor",
    "Muon",
    "Shampoo",
    "Sophia",
    "muon_param_groups",
    "Adagrad",
    "Adam",
    "AdamW",
    "AdEMAMix",
    "GeometricBatchSize",
    "GradwiseOptimizer",
    "LBFGS",
    "Lion",
    "NAdam",
    "Newton",
    "NewtonCG",
    "PSGDKron",
    "RMSprop",
    "SAGA",
    "ScheduleFreeAdamW",
    "ScheduleFreeSGD",
    "SQN",
    "SVRG",
    "weight_decay_groups",
]
