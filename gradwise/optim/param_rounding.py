r"""bfloat16 parameters updated in float32 and stored back by stochastic rounding or with a Kahan
compensation: ``param_rounding``, for pure-bf16 training (no float32 master copy).

A bfloat16 parameter holds 8 significant bits: an update smaller than half its ulp
(:math:`2^{-9}` of its value) is lost when the result is rounded to nearest, which is what
happens to most updates late in training at small learning rates (Zamirai et al. 2021,
"Revisiting BFloat16 Training", arXiv:2010.06192). ``param_rounding`` says how a step stores a
bf16 parameter:

- ``"nearest"`` (the default): torch's rule, the update computed in the parameter's dtype and
  rounded to nearest;
- ``"stochastic"``: the update computed in float32 from the stored value, the result rounded
  stochastically to one of its two bf16 neighbours (unbiased: :math:`\mathbb{E}[\theta]` follows
  the float32 trajectory; :func:`gradwise.optim.state_formats.stochastic_round_bf16`), seeded per
  parameter and write so that a resumed run rounds as the uninterrupted one did;
- ``"kahan"``: a bf16 compensation :math:`c` (``state["param_compensation"]``, 2 bytes per
  parameter) keeps what the rounding dropped: the step computes in float32 from
  :math:`\theta + c`, then :math:`\theta \leftarrow \mathrm{rn}(r)` and
  :math:`c \leftarrow \mathrm{rn}(r - \theta)` for the result :math:`r` (Kahan summation, as
  Zamirai et al. use it), so :math:`\theta + c` carries about 16 significant bits.

During the step a parameter's ``.data`` is a float32 working copy, so every update path (foreach,
fused, a ``state_format``'s) runs unchanged; state it creates then is float32 (its moments are
fp32 unless a ``state_format`` stores them in fewer bits). Parameters of other dtypes are
untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from gradwise.optim.state_formats import draw_seed, stochastic_round_bf16

PARAM_ROUNDINGS = ("nearest", "stochastic", "kahan")
"""The values of ``param_rounding``."""

COMPENSATION_KEY = "param_compensation"
DRAWS_KEY = "param_rounding_draws"


def rounds_in_float32(group: dict[str, Any], param: Tensor) -> bool:
    """Whether ``group``'s step computes ``param`` in float32 and rounds it back (a bf16 parameter
    under ``"stochastic"`` or ``"kahan"``)."""
    return group.get("param_rounding", "nearest") != "nearest" and param.dtype == torch.bfloat16


def state_element_size(group: dict[str, Any], param: Tensor) -> int:
    """Bytes per value of the state the step creates for ``param``: float32 where it computes in
    float32, the parameter's own otherwise."""
    return 4 if rounds_in_float32(group, param) else param.element_size()


def compensation_bytes(group: dict[str, Any], param: Tensor) -> int:
    """Bytes of ``param``'s Kahan compensation (none without ``"kahan"``)."""
    kahan = group.get("param_rounding") == "kahan" and param.dtype == torch.bfloat16
    return 2 * param.numel() if kahan else 0


@contextmanager
def float32_working_params(group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                           state_of: Callable[[Tensor], MutableMapping]) -> Iterator[list[Tensor]]:
    """Inside: each bf16 parameter of ``params`` that ``group`` rounds has a float32 working copy as
    its ``.data`` (with ``"kahan"``, the stored value plus its compensation), and the gradients to
    update with (those parameters' in float32) are yielded. On leaving, each result is rounded
    back into the parameter's own storage as ``group["param_rounding"]`` says; if the update
    raised, the parameters keep their stored values."""
    rounding = group.get("param_rounding", "nearest")
    stored: dict[Tensor, Tensor] = {}
    working_grads = []
    for param, grad in zip(params, grads):
        if rounds_in_float32(group, param):
            state = state_of(param)
            working = param.detach().float()
            if rounding == "kahan" and COMPENSATION_KEY in state:
                working += state[COMPENSATION_KEY].float()
            stored[param] = param.data
            param.data = working
            grad = grad.float()
        working_grads.append(grad)
    try:
        yield working_grads
    except BaseException:
        for param, original in stored.items():
            param.data = original
        raise
    for param, original in stored.items():
        result = param.data
        param.data = original
        state = state_of(param)
        if rounding == "stochastic":
            draws = state.get(DRAWS_KEY, 0)
            state[DRAWS_KEY] = draws + 1
            original.copy_(stochastic_round_bf16(result, draw_seed(draws, "param", result.numel())))
        else:
            original.copy_(result)  # rounded to nearest
            compensation = (result - original.float()).to(torch.bfloat16)
            if COMPENSATION_KEY in state:
                state[COMPENSATION_KEY].copy_(compensation)
            else:
                state[COMPENSATION_KEY] = compensation
