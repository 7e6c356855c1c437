"""Classifiers on generated data with a known structure: ``mlp`` and ``logreg``.

The data come from a *teacher*: inputs ``x ~ N(0, I_d)`` and labels
``y = argmax_c f(x)_c`` of a fixed random function ``f``, so every label is a deterministic
function of its input and a perfect classifier exists (Bayes accuracy 1). For ``mlp`` the
teacher is a one-hidden-layer tanh network (Gardner & Derrida 1989; the student-teacher
setting of Saad & Solla 1995), which a linear model cannot fit: the student is an MLP
with ReLU hidden layers. For ``logreg`` the teacher is linear, ``f(x) = W x``, with labels
drawn from ``softmax(W x)`` (so the best possible accuracy is below 1 and known by
sampling: the Bayes classifier predicts ``argmax W x``); the student is multinomial
logistic regression, which can represent the teacher exactly.

The target is a validation accuracy: 0.85 for ``mlp`` (its defaults reach about 0.89 in
600 steps); for ``logreg``, 0.98 times the
accuracy of the teacher's own argmax on the validation set.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from gradwise.problems.data import Batch, ShuffledEpochs
from gradwise.problems.workload import Target, Workload
from gradwise.validation import check_int

MLP_TARGET = 0.85
DATA_SEED = 1234
"""The teacher and the data are the same for every run; ``seed`` moves the model and the batches."""


class MLP(nn.Sequential):
    """A stack of ReLU hidden layers under a linear classifier head, which is its last layer.

    The model names its head the way Hugging Face models do, ``get_output_embeddings()``,
    which :func:`gradwise.optim.muon_param_groups` reads: Muon's recipe trains the layer that
    maps to the logits with AdamW and only the hidden matrices with Muon, and an untied head
    cannot be told from a hidden layer by its shape. A slice of the stack (split learning cuts
    it in two) is an ``MLP`` only when it holds the head; any other slice is a plain
    ``nn.Sequential``, which names no head, so a hidden layer is never taken for one.
    """

    def get_output_embeddings(self) -> nn.Module:
        """The classifier head (the last layer)."""
        return self[-1]

    def __getitem__(self, index: slice | int) -> nn.Sequential | nn.Module:
        item = super().__getitem__(index)
        if isinstance(item, MLP) and (len(item) == 0 or item[-1] is not self[-1]):
            return nn.Sequential(OrderedDict(item.named_children()))
        return item


def relu_mlp(inputs: int, hidden: int, depth: int, classes: int) -> MLP:
    """``depth`` ReLU layers of width ``hidden`` on ``inputs`` features, then the head to ``classes`` logits."""
    layers: list[nn.Module] = []
    width = inputs
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return MLP(*layers, nn.Linear(width, classes))


def teacher_data(dim: int, classes: int, count: int, hidden: int | None, logit_scale: float = 4.0,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` inputs, their labels and the teacher's argmax labels (equal to the labels when deterministic)."""
    generator = torch.Generator().manual_seed(DATA_SEED)
    inputs = torch.randn(count, dim, generator=generator)
    if hidden is None:
        weight = torch.randn(classes, dim, generator=generator) * logit_scale / dim**0.5
        logits = inputs @ weight.T
        labels = torch.multinomial(F.softmax(logits, dim=1), 1, generator=generator).squeeze(1)
        return inputs, labels, logits.argmax(dim=1)
    first = torch.randn(hidden, dim, generator=generator) * 2.0 / dim**0.5
    second = torch.randn(classes, hidden, generator=generator) / hidden**0.5
    labels = (torch.tanh(inputs @ first.T) @ second.T).argmax(dim=1)
    return inputs, labels, labels


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    inputs, labels = batch
    return F.cross_entropy(model(inputs).float(), labels)


@torch.no_grad()
def accuracy_and_loss(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    logits = model(inputs.to(device)).float()
    model.train(was_training)
    labels = labels.to(device)
    return {
        "val_accuracy": (logits.argmax(dim=1) == labels).float().mean().item(),
        "val_loss": F.cross_entropy(logits, labels).item(),
    }


def classifier(name: str, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, train_count: int,
               batch_size: int, seed: int, target: Target, description: str, options: dict) -> Workload:
    """A classification workload: the first ``train_count`` rows train, the rest validate."""
    if not 0 < train_count < inputs.shape[0]:
        raise ValueError(f"need at least one training and one validation example, got {inputs.shape[0]} rows")
    validation = (inputs[train_count:], labels[train_count:])
    return Workload(
        name=name,
        model=model,
        train_data=ShuffledEpochs(inputs[:train_count], labels[:train_count], batch_size, seed),
        loss=classification_loss,
        evaluate=lambda model, full: accuracy_and_loss(model, *validation),
        target=target,
        unit="examples",
        eval_metrics=("val_accuracy", "val_loss"),
        description=description,
        options=options,
    )


def majority_accuracy(labels: torch.Tensor) -> float:
    return torch.bincount(labels).max().item() / labels.numel()


def mlp(batch_size: int, seed: int = 0, dim: int = 8, classes: int = 4, hidden: int = 128, depth: int = 2,
        teacher_hidden: int = 8, train_examples: int = 8192, val_examples: int = 2048) -> Workload:
    """The ``mlp`` workload: a ReLU MLP student on a tanh-network teacher's labels."""
    for name, value in dict(dim=dim, classes=classes, hidden=hidden, depth=depth, teacher_hidden=teacher_hidden,
                            train_examples=train_examples, val_examples=val_examples).items():
        check_int(name, value, 2 if name == "classes" else 1)
    inputs, labels, _ = teacher_data(dim, classes, train_examples + val_examples, teacher_hidden)
    torch.manual_seed(seed)
    model = relu_mlp(dim, hidden, depth, classes)
    baseline = majority_accuracy(labels[train_examples:])
    return classifier(
        "mlp", model, inputs, labels, train_examples, batch_size, seed,
        Target("val_accuracy", MLP_TARGET, True, baseline, "majority-class accuracy"),
        f"{train_examples} + {val_examples} Gaussian inputs in {dim}-D labelled by a tanh teacher "
        f"({teacher_hidden} hidden units, {classes} classes); ReLU MLP {depth} x {hidden}",
        dict(dim=dim, classes=classes, hidden=hidden, depth=depth, teacher_hidden=teacher_hidden,
             train_examples=train_examples, val_examples=val_examples),
    )


def logreg(batch_size: int, seed: int = 0, dim: int = 32, classes: int = 4, train_examples: int = 8192,
           val_examples: int = 2048) -> Workload:
    """The ``logreg`` workload: multinomial logistic regression on a linear softmax teacher's samples."""
    for name, value in dict(dim=dim, classes=classes, train_examples=train_examples,
                            val_examples=val_examples).items():
        check_int(name, value, 2 if name == "classes" else 1)
    inputs, labels, bayes = teacher_data(dim, classes, train_examples + val_examples, None)
    torch.manual_seed(seed)
    bayes_accuracy = (bayes[train_examples:] == labels[train_examples:]).float().mean().item()
    return classifier(
        "logreg", nn.Linear(dim, classes), inputs, labels, train_examples, batch_size, seed,
        Target("val_accuracy", 0.98 * bayes_accuracy, True, majority_accuracy(labels[train_examples:]),
               "majority-class accuracy"),
        f"{train_examples} + {val_examples} Gaussian inputs in {dim}-D with labels sampled from a linear "
        f"softmax teacher ({classes} classes, Bayes accuracy {bayes_accuracy:.3f}); logistic regression",
        dict(dim=dim, classes=classes, train_examples=train_examples, val_examples=val_examples),
    )
