"""One step of any gradwise optimizer, called the way its description says (:data:`~gradwise.optim.description.Drive`).

The optimizers differ in how a step is called: after a backward pass, with a closure that
calls ``backward()``, with a loss function they differentiate themselves, with a sample
index or a full-objective snapshot. :func:`drive_step` holds that knowledge once, so a
training loop, a benchmark or a test steps every optimizer from the same inputs: a function
returning the loss of the step's batch (with its graph, no ``backward()``), and what the
drive needs besides (the full objective for a snapshot, the sample index, a Hessian sample or
a Hessian-diagonal estimate).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from torch import Tensor
from torch.optim import Optimizer

from gradwise.optim.description import Drive, HessianRefreshed, description_of

LossFn = Callable[[], Tensor]
"""The loss of one batch (or of the full objective), with its graph: no ``backward()`` called."""

HessianEstimate = Callable[[Tensor, list[Tensor]], Sequence[Tensor]]
"""``estimate(loss, params)``: a Hessian-diagonal estimate per parameter from ``loss``'s graph
(Sophia: Hutchinson, or a Gauss-Newton diagonal), for drive ``"hessian_refresh"``."""


class Snapshotted(Protocol):
    """What an optimizer driven by ``"snapshot_closure"`` offers (SVRG)."""

    def update_snapshot(self, full_closure: Callable[[], Any]) -> Any: ...


def backward_closure(optimizer: Optimizer, loss: LossFn) -> Callable[[], Tensor]:
    """torch's closure protocol over ``loss``: zero the gradients, evaluate, ``backward()``, return the loss."""

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = loss()
        value.backward()
        return value

    return closure


def drive_step(optimizer: Optimizer, loss: LossFn, *, full_loss: LossFn | None = None, slot: int | None = None,
               hessian_loss: LossFn | None = None, hessian_estimate: HessianEstimate | None = None,
               drive: Drive | None = None) -> Tensor:
    """One step of ``optimizer`` on ``loss`` (the step's batch), as its class's description drives it;
    returns the loss at the starting point, detached.

    - ``full_loss``: the full objective; given, a ``"snapshot_closure"`` optimizer (SVRG) takes a
      new snapshot from it before the step (the caller decides when: each epoch of its data);
    - ``slot``: the index of the sample (or fixed block of samples) ``loss`` evaluates, for
      ``"sample_index"`` (SAGA);
    - ``hessian_loss``: the sample a ``"hessian_closure"`` optimizer (SQN) takes its curvature
      from (default: ``loss``);
    - ``hessian_estimate``: for ``"hessian_refresh"`` (Sophia), called on the batch's loss when
      the optimizer's estimate is due;
    - ``drive``: how to call it, when not its class's description's (torch's own class, driven
      as the gradwise class it is compared with).

    What a drive needs and is not given is a ``ValueError`` naming it.
    """
    drive = drive or description_of(type(optimizer), inherited=True).drive
    step: Callable[..., Any] = optimizer.step  # the drives' signatures differ from torch's step(closure)
    value: Any
    if drive in ("step", "model", "hessian_refresh"):
        optimizer.zero_grad()
        value = loss()
        if drive == "hessian_refresh" and cast(HessianRefreshed, optimizer).hessian_update_due:
            if hessian_estimate is None:
                raise ValueError(f"{type(optimizer).__name__} is driven by 'hessian_refresh': its estimate is due, "
                                 "give hessian_estimate")
            params = [p for group in optimizer.param_groups for p in group["params"]]
            cast(HessianRefreshed, optimizer).update_hessian(list(hessian_estimate(value, params)), params)
        value.backward()
        step()
    elif drive == "closure":
        value = step(backward_closure(optimizer, loss))
    elif drive == "loss_closure":
        value = step(loss)
    elif drive == "hessian_closure":
        optimizer.zero_grad()
        value = loss()
        value.backward()
        step(hessian_closure=hessian_loss or loss)
    elif drive == "snapshot_closure":
        if full_loss is not None:
            cast(Snapshotted, optimizer).update_snapshot(backward_closure(optimizer, full_loss))
        value = step(backward_closure(optimizer, loss))
    elif drive == "sample_index":
        if slot is None:
            raise ValueError(f"{type(optimizer).__name__} is driven by 'sample_index': give slot, the index of "
                             "the sample whose loss is evaluated")
        value = step(slot, backward_closure(optimizer, loss))
    else:  # a Drive added to the vocabulary without a way to call it here
        raise ValueError(f"drive {drive!r} of {type(optimizer).__name__} has no driver")
    return value.detach()
