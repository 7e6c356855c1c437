r"""Gauss-Newton-vector products for a loss on model outputs.

For :math:`f(x) = \ell(z(x))` with model outputs :math:`z(x)` and a convex loss
:math:`\ell`, the generalised Gauss-Newton matrix is

.. math:: G = J^\top H_\ell J,\qquad J = \partial z / \partial x,\quad H_\ell = \nabla^2_z \ell,

the Hessian with the term :math:`\sum_k \partial_{z_k}\ell\, \nabla^2 z_k` dropped; it is
positive semidefinite whenever :math:`\ell` is convex (Schraudolph 2002, Neural Comput. 14;
Martens 2010, ICML). :math:`Gv` costs one forward-mode product :math:`Jv`, one Hessian-vector
product of :math:`\ell` in output space and one reverse-mode product :math:`J^\top u`.
For a linear model with squared error, :math:`G` is the Hessian.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from gradwise.curvature.vectors import check_like


def gnvp(
    outputs_fn: Callable[[Sequence[Tensor]], Tensor],
    loss_on_outputs: Callable[[Tensor], Tensor],
    params: Sequence[Tensor],
    vector: Sequence[Tensor],
) -> list[Tensor]:
    r""":math:`J^\top H_\ell J v` at ``params``.

    Args:
        outputs_fn: functional model ``params -> z`` (e.g. from :func:`.vectors.module_outputs`).
        loss_on_outputs: ``z -> scalar`` loss (targets bound in the closure), e.g.
            ``lambda z: F.cross_entropy(z, y)``.
        params: the point.
        vector: the direction, shaped like ``params``.

    Example::

        outputs_fn, params = module_outputs(model, x)
        Gv = gnvp(outputs_fn, lambda z: F.cross_entropy(z, y), params, v)
    """
    vector = check_like("vector", vector, params)
    primals = tuple(p.detach() for p in params)

    def outputs(*xs: Tensor) -> Tensor:
        return outputs_fn(list(xs))

    z, jv = torch.func.jvp(outputs, primals, tuple(v.detach() for v in vector))  # type: ignore[misc]  # torch.func.jvp is annotated 2-or-3-tuple (no overload on has_aux)
    _, hjv = torch.func.jvp(torch.func.grad(loss_on_outputs), (z.detach(),), (jv,))  # type: ignore[misc]  # as above
    _, vjp_fn = torch.func.vjp(outputs, *primals)  # type: ignore[misc]  # likewise torch.func.vjp
    return list(vjp_fn(hjv))
