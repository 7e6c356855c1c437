"""Curvature without forming the Hessian: Hessian- and Gauss-Newton-vector products,
Hutchinson estimates of the diagonal and trace, extreme eigenvalues by power iteration and
Lanczos, condition numbers, the Gauss-Newton-Bartlett diagonal estimate (Sophia), and the
bias of a noisy Newton step.

Losses are functional closures ``loss_fn(params) -> scalar`` (build one for a model with
:func:`module_loss`); vectors are lists of tensors shaped like ``params``::

    from gradwise.curvature import hvp, hutchinson_diagonal, module_loss, condition_number

    loss_fn, params = module_loss(model, torch.nn.functional.cross_entropy, x, y)
    Hv = hvp(loss_fn, params, v, method="forward_over_reverse")
    diag = hutchinson_diagonal(loss_fn, params, samples=4, generator=torch.Generator().manual_seed(0))
    print(condition_number(loss_fn, params, steps=30).condition_number)
"""

from gradwise.curvature.condition import ConditionEstimate, condition_number, model_condition_number
from gradwise.curvature.gauss_newton import gnvp
from gradwise.curvature.gauss_newton_bartlett import gauss_newton_bartlett, sample_labels
from gradwise.curvature.hutchinson import hutchinson_diagonal, hutchinson_trace, rademacher_like
from gradwise.curvature.hvp import (
    default_fd_eps,
    gradient,
    hvp,
    hvp_double_backward,
    hvp_finite_difference,
    hvp_forward_over_reverse,
)
from gradwise.curvature.noisy_newton import NoisyNewtonBias, gamma_curvatures, noisy_newton_bias
from gradwise.curvature.operator import hessian_operator, matrix_operator
from gradwise.curvature.spectrum import (
    PowerIterationResult,
    TopEigenpair,
    extreme_eigenvalues,
    lanczos,
    power_iteration,
    top_eigenpair,
)
from gradwise.curvature.vectors import flatten, module_loss, module_outputs, unflatten

__all__ = [
    "ConditionEstimate",
    "NoisyNewtonBias",
    "PowerIterationResult",
    "TopEigenpair",
    "condition_number",
    "default_fd_eps",
    "extreme_eigenvalues",
    "flatten",
    "gamma_curvatures",
    "gauss_newton_bartlett",
    "gnvp",
    "gradient",
    "hessian_operator",
    "hutchinson_diagonal",
    "hutchinson_trace",
    "hvp",
    "hvp_double_backward",
    "hvp_finite_difference",
    "hvp_forward_over_reverse",
    "lanczos",
    "matrix_operator",
    "model_condition_number",
    "module_loss",
    "module_outputs",
    "noisy_newton_bias",
    "power_iteration",
    "rademacher_like",
    "sample_labels",
    "top_eigenpair",
    "unflatten",
]
