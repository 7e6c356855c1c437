r"""L-BFGS (full batch), with torch.optim.LBFGS's options, state and iterates."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradwise.optim.base import GradwiseOptimizer, ParamsT
from gradwise.optim.description import Description, Preset, StateSize
from gradwise.optim.flat_params import SingleParamGroup, single_group_params
from gradwise.optim.line_search import bracketing_wolfe_search, strong_wolfe_search
from gradwise.optim.quasi_newton import CurvaturePairs, history_state
from gradwise.validation import check_choice, check_int, check_range

LINE_SEARCHES = (None, "strong_wolfe", "more_thuente")


def _lbfgs_state(shape, options) -> StateSize:
    """The quasi-Newton history (:func:`~gradwise.optim.quasi_newton.history_state`) in torch's
    layout: also a 0-d ``rho`` per pair and the initial scaling ``H_diag``."""
    history = history_state(shape, options)
    return StateSize(history.values, scalars=options.get("history_size", 100) + 1)


class LBFGS(SingleParamGroup, GradwiseOptimizer):
    r"""Limited-memory BFGS (Nocedal 1980; Liu & Nocedal 1989, Math. Prog. 45), for
    deterministic (full-batch) losses, with the arguments, defaults, state and iterates of
    ``torch.optim.LBFGS``.

    Each iteration takes the direction :math:`d_k = -H_k g_k` from the two-loop recursion
    over the last ``history_size`` pairs :math:`s = x_{k+1}-x_k`, :math:`y = g_{k+1}-g_k`
    (a pair is kept only if :math:`s^\top y > 10^{-10}`), with :math:`H^0 = \gamma I`,
    :math:`\gamma = s^\top y / y^\top y`; the first direction is :math:`-g_0`. The step
    :math:`t_k` comes from ``line_search_fn``:

    - ``None`` (the default, torch's): fixed steps ``lr``, the first scaled by
      :math:`\min(1, 1/\lVert g_0\rVert_1)`;
    - ``"strong_wolfe"``: torch's search (minFunc's bracketing and cubic zoom,
      :func:`~gradwise.optim.line_search.bracketing_wolfe_search`, ``c1=1e-4``, ``c2=0.9``)
      from the same trial step as ``None``;
    - ``"more_thuente"``: the Moré-Thuente search of L-BFGS-B and MINPACK-2
      (:func:`~gradwise.optim.line_search.strong_wolfe_search`, ``c1=1e-3``, ``c2=0.9``), whose
      first trial moves a unit distance (:math:`1/\lVert g_0\rVert_2`). Interpolation makes
      most iterations cost one evaluation: it reaches the N-D Rosenbrock minimiser with about
      as many evaluations as scipy's L-BFGS-B, where ``"strong_wolfe"`` needs about 1.5x
      (``benchmarks/lbfgs_evaluations.py``). It is gradwise's recommendation for smooth
      full-batch problems; it is not the default because a class named like torch's keeps
      torch's defaults. When it finds no decrease along :math:`d` the parameters stay put and
      ``state['line_search_failed']`` is set (rounding error dominates, as scipy's "abnormal
      termination in line search").

    With ``None`` and ``"strong_wolfe"`` the iterates equal ``torch.optim.LBFGS``'s (to
    rounding). One ``step()`` runs up to ``max_iter`` iterations and ``max_eval``
    evaluations (default ``max_iter * 5 // 4``) and stops early when
    :math:`\lVert g\rVert_\infty \le` ``tolerance_grad`` (``-inf`` never stops on it), or
    the step or the change of the loss is below ``tolerance_change``. It returns the loss
    at the point it started from, as torch does. The state lives on the first parameter
    with torch's keys and meaning (``d``, ``t``, ``old_dirs`` (the :math:`y`),
    ``old_stps`` (the :math:`s`), ``ro``, ``H_diag``, ``prev_flat_grad``, ``prev_loss``,
    ``func_evals``, ``n_iter``), so a ``state_dict`` moves between this class and torch's in
    both directions and a run resumes exactly. Complex parameters are optimized as their
    ``view_as_real``, as torch does.

    Non-finite values (a choice: torch lets them into the parameters): a step that starts
    where the loss or the gradient is not finite returns at once without changing anything;
    an iteration whose new point has a non-finite loss or gradient is undone (the
    parameters return to where it started, which had finite values) and the step ends; so
    does one whose direction is not finite (a curvature history overflowed in float16).
    Each sets ``state['nonfinite']``.

    State: ``2 * history_size + 3`` vectors of the parameters' size.

    Example::

        opt = gradwise.optim.LBFGS(model.parameters(), history_size=10, line_search_fn="more_thuente")
        def closure():
            opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss
        opt.step(closure)
    """

    description = Description(
        drive="closure",
        sharding=None,
        state=_lbfgs_state,
        flat_state=True,
        presets={"lbfgs": Preset("L-BFGS with a history of 10", {"history_size": 10},
                                 train={"line_search_fn": "strong_wolfe", "max_iter": 1}, lr_scale=100.0)},
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1.0,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = None,
    ) -> None:
        if max_eval is None and isinstance(max_iter, int) and not isinstance(max_iter, bool):
            max_eval = max_iter * 5 // 4
        defaults = dict(
            lr=lr,
            max_iter=max_iter,
            max_eval=max_eval,
            tolerance_grad=tolerance_grad,
            tolerance_change=tolerance_change,
            history_size=history_size,
            line_search_fn=line_search_fn,
        )
        super().__init__(params, defaults)

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0, low_open=True)
        check_int("max_iter", group["max_iter"], 1)
        check_int("max_eval", group["max_eval"], 1)
        tolerance_grad = group["tolerance_grad"]
        if not (isinstance(tolerance_grad, numbers.Real) and math.isinf(tolerance_grad)):
            # finite, or -inf (never stop) or +inf (stop at once), as torch
            check_range("tolerance_grad", tolerance_grad)
        check_range("tolerance_change", group["tolerance_change"], 0.0)
        check_int("history_size", group["history_size"], 1)
        check_choice("line_search_fn", group["line_search_fn"], LINE_SEARCHES)

    @property
    def history_full(self) -> bool:
        """Whether the history holds ``history_size`` curvature pairs: from then on the state is
        as large as it gets (what the memory rule counts)."""
        group = self.param_groups[0]
        return len(self.state[group["params"][0]].get("old_dirs", [])) == group["history_size"]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # noqa: C901 (one algorithm)
        """Run up to ``max_iter`` L-BFGS iterations; ``closure`` clears the gradients,
        computes the loss, calls ``backward()`` and returns the loss. Returns the loss at
        the starting point (the closure's first value)."""
        if closure is None:
            raise RuntimeError("LBFGS.step needs a closure that re-evaluates the loss and its gradient")
        group = self.param_groups[0]
        lr = group["lr"]
        if isinstance(lr, Tensor):  # a 1-element tensor lr stays a 0-d tensor, as in torch's arithmetic
            lr = lr.reshape(())
        max_iter, max_eval = group["max_iter"], group["max_eval"]
        tolerance_grad, tolerance_change = group["tolerance_grad"], group["tolerance_change"]
        search = group["line_search_fn"]
        flat = single_group_params(self)
        state = self.state[flat.params[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)
        state["line_search_failed"] = False
        state["nonfinite"] = False

        def evaluate() -> tuple[Any, float, Tensor]:
            with torch.enable_grad():
                loss = closure()
            state["func_evals"] += 1
            return loss, float(loss), flat.grads()

        orig_loss, loss, grad = evaluate()
        evaluations = 1
        if flat.numel == 0:
            return orig_loss  # nothing to optimize (every parameter is empty)
        grad_max = float(grad.abs().max())
        if not (math.isfinite(loss) and math.isfinite(grad_max)):
            state["nonfinite"] = True
            return orig_loss
        if grad_max <= tolerance_grad:
            return orig_loss

        d, t = state.get("d"), state.get("t")
        old_dirs, old_stps, ro = state.get("old_dirs", []), state.get("old_stps", []), state.get("ro", [])
        h_diag = state.get("H_diag", 1.0)
        prev_flat_grad, prev_loss = state.get("prev_flat_grad"), state.get("prev_loss")
        iterations = 0
        while iterations < max_iter:
            iterations += 1
            state["n_iter"] += 1
            first = state["n_iter"] == 1
            if first:
                d = grad.neg()
                old_dirs, old_stps, ro, h_diag = [], [], [], 1.0
            else:
                y = grad.sub(prev_flat_grad)
                s = d.mul(t)
                pairs = CurvaturePairs(old_stps, old_dirs, group["history_size"], rho=ro)
                ys = pairs.push(s, y)
                if ys is not None:
                    h_diag = ys / y.dot(y)
                d = pairs.direction(grad, h_diag)
            prev_flat_grad = grad.clone(memory_format=torch.contiguous_format)
            prev_loss = loss
            t = lr
            if first:  # torch's first step: lr * min(1, 1 / |g|_1), a tensor as in torch
                inverse = 1.0 / grad.abs().sum()
                t = inverse * lr if inverse < 1.0 else lr
            gtd = grad.dot(d)  # a 0-d tensor, so the search rounds as torch's does
            if gtd > -tolerance_change:
                break
            if not torch.isfinite(gtd):  # the history overflowed (float16, say): no direction to follow
                state["nonfinite"] = True
                break

            start = flat.values()
            if search is None:
                flat.add_(d, alpha=t)
                if iterations != max_iter:  # torch skips the evaluation after the last iteration
                    _, loss, grad = evaluate()
                    evaluations += 1
            else:
                def phi(step: float, start: Tensor = start, d: Tensor = d) -> tuple[float, Tensor, Tensor]:
                    flat.add_(d, alpha=step)
                    _, value, grad_t = evaluate()
                    flat.assign(start)
                    return value, grad_t.dot(d), grad_t

                if search == "strong_wolfe":
                    # 0-d tensor slopes, step and scale where the search declares floats: its arithmetic
                    # runs on them unchanged and so rounds as torch.optim.LBFGS does (exact parity)
                    result = bracketing_wolfe_search(
                        phi,  # type: ignore[arg-type]
                        loss,
                        gtd,  # type: ignore[arg-type]
                        t,
                        grad,
                        direction_scale=d.abs().max(),  # type: ignore[arg-type]
                        max_evaluations=max_eval - evaluations,
                    )
                else:
                    trial = float(lr) / float(grad.norm()) if first else float(lr)

                    def float_phi(
                        step: float, phi: Callable[[float], tuple[float, Tensor, Tensor]] = phi
                    ) -> tuple[float, float, Tensor]:
                        value, slope, grad_t = phi(step)
                        return value, float(slope), grad_t

                    result = strong_wolfe_search(
                        float_phi, loss, float(gtd), trial, max_evaluations=max(1, max_eval - evaluations),
                    )
                    if not result.converged and result.value >= loss:
                        # No decrease along d within the budget: rounding dominates; stop here.
                        state["line_search_failed"] = True
                        evaluations += result.evaluations
                        break
                evaluations += result.evaluations
                t, loss, grad = result.step, result.value, result.payload
                flat.add_(d, alpha=t)
            if not (math.isfinite(loss) and bool(torch.isfinite(grad).all())):
                flat.assign(start)  # never keep a point where the loss or its gradient is not finite
                loss, grad, t = prev_loss, prev_flat_grad.clone(), 0.0
                state["nonfinite"] = True
                break

            if iterations == max_iter or evaluations >= max_eval:
                break
            if float(grad.abs().max()) <= tolerance_grad:
                break
            if float(d.mul(t).abs().max()) <= tolerance_change:
                break
            if abs(loss - prev_loss) < tolerance_change:
                break

        state.update(
            d=d, t=t, old_dirs=old_dirs, old_stps=old_stps, ro=ro, H_diag=h_diag,
            prev_flat_grad=prev_flat_grad, prev_loss=prev_loss,
        )
        return orig_loss
