r"""L-BFGS with a Moré-Thuente strong-Wolfe line search (full batch)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from gradwise.optim.base import GradwiseOptimizer, ParamsT
from gradwise.optim.flat_params import single_group_params
from gradwise.optim.line_search import strong_wolfe_search
from gradwise.optim.quasi_newton import lbfgs_direction
from gradwise.validation import check_choice, check_int, check_range

LINE_SEARCHES = ("strong_wolfe", None)


class LBFGS(GradwiseOptimizer):
    r"""Limited-memory BFGS (Nocedal 1980; Liu & Nocedal 1989, Math. Prog. 45) with the
    Moré-Thuente line search (Moré & Thuente 1994), for deterministic (full-batch) losses.

    Each iteration takes the direction :math:`d_k = -H_k g_k` from the two-loop recursion
    over the last ``history_size`` pairs :math:`s = x_{k+1}-x_k`, :math:`y = g_{k+1}-g_k`
    (a pair is kept only if :math:`s^\top y > 10^{-10}`), with :math:`H^0 = \gamma I`,
    :math:`\gamma = s^\top y / y^\top y`, and a step :math:`t_k` satisfying the strong Wolfe
    conditions (``c1=1e-3``, ``c2=0.9``, as L-BFGS-B). The trial step is 1, except on the
    first iteration, where :math:`d_0 = -g_0` and the trial is :math:`1/\lVert g_0\rVert_2`
    (as L-BFGS-B, so the first trial moves a unit distance). Interpolation makes most
    iterations cost one function evaluation; this reaches the N-D Rosenbrock minimiser with
    about as many evaluations as scipy's L-BFGS-B (see ``tests/test_second_order.py``),
    where ``torch.optim.LBFGS``'s search needs about 1.5x.

    ``line_search_fn=None`` takes fixed steps ``lr`` (the first scaled by
    :math:`\min(1, 1/\lVert g_0\rVert_1)`), and then the iterates equal ``torch.optim.LBFGS``'s
    with the same options. The arguments and the stopping rules of one ``step()`` follow
    ``torch.optim.LBFGS``: up to ``max_iter`` iterations and ``max_eval`` evaluations; stop
    when :math:`\lVert g\rVert_\infty \le` ``tolerance_grad``, or the step or the change of
    the loss is below ``tolerance_change``; also when the line search finds no decrease (the
    parameters stay put and ``state['line_search_failed']`` is set: rounding error dominates,
    as scipy's "abnormal termination in line search"). ``state['func_evals']`` counts every
    evaluation of the closure. Defaults from torch, except ``line_search_fn="strong_wolfe"``.

    State: ``2 * history_size + 2`` vectors of the parameters' size.

    Example::

        opt = gradwise.optim.LBFGS(model.parameters(), history_size=10)
        def closure():
            opt.zero_grad(); loss = loss_fn(model(x), y); loss.backward(); return loss
        opt.step(closure)
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        max_iter: int = 20,
        max_eval: int | None = None,
        tolerance_grad: float = 1e-7,
        tolerance_change: float = 1e-9,
        history_size: int = 100,
        line_search_fn: str | None = "strong_wolfe",
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
        if len(self.param_groups) != 1:
            raise ValueError(f"LBFGS supports a single param group, got {len(self.param_groups)}")

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0, low_open=True)
        check_int("max_iter", group["max_iter"], 1)
        check_int("max_eval", group["max_eval"], 1)
        check_range("tolerance_grad", group["tolerance_grad"], 0.0)
        check_range("tolerance_change", group["tolerance_change"], 0.0)
        check_int("history_size", group["history_size"], 1)
        check_choice("line_search_fn", group["line_search_fn"], LINE_SEARCHES)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # noqa: C901 (one algorithm)
        """Run up to ``max_iter`` L-BFGS iterations; ``closure`` clears the gradients,
        computes the loss, calls ``backward()`` and returns the loss."""
        if closure is None:
            raise RuntimeError("LBFGS.step needs a closure that re-evaluates the loss and its gradient")
        group = self.param_groups[0]
        flat = single_group_params(self)
        state = self.state[flat.params[0]]
        state.setdefault("func_evals", 0)
        state.setdefault("n_iter", 0)
        state["line_search_failed"] = False

        def evaluate() -> tuple[Tensor, float, Tensor]:
            with torch.enable_grad():
                loss = closure()
            state["func_evals"] += 1
            return loss, float(loss), flat.grads().clone()

        orig_loss, loss, grad = evaluate()
        evaluations = 1
        if float(grad.abs().max()) <= group["tolerance_grad"]:
            return orig_loss

        s_history: list[Tensor] = state.setdefault("old_dirs", [])
        y_history: list[Tensor] = state.setdefault("old_stps", [])
        iterations = 0
        while iterations < group["max_iter"]:
            iterations += 1
            state["n_iter"] += 1
            first = state["n_iter"] == 1
            if first:
                direction = grad.neg()
                s_history.clear()
                y_history.clear()
                state["H_diag"] = 1.0
            else:
                y = grad - state["prev_flat_grad"]
                s = state["d"] * state["t"]
                ys = float(torch.dot(y, s))
                if ys > 1e-10:
                    if len(s_history) == group["history_size"]:
                        s_history.pop(0)
                        y_history.pop(0)
                    s_history.append(s)
                    y_history.append(y)
                    state["H_diag"] = ys / float(torch.dot(y, y))
                direction = lbfgs_direction(grad, s_history, y_history, state["H_diag"])
            state["prev_flat_grad"] = grad.clone()
            previous_loss = loss
            slope = float(torch.dot(grad, direction))
            if slope > -group["tolerance_change"]:
                break

            if group["line_search_fn"] == "strong_wolfe":
                trial = group["lr"] / float(grad.norm()) if first else group["lr"]
                start = flat.values()

                def phi(t: float, start: Tensor = start, direction: Tensor = direction) -> tuple[float, float, Any]:
                    flat.assign(start + t * direction)
                    loss_t, value, grad_t = evaluate()
                    return value, float(torch.dot(grad_t, direction)), (loss_t, grad_t)

                result = strong_wolfe_search(
                    phi, loss, slope, trial, max_evaluations=max(1, group["max_eval"] - evaluations)
                )
                evaluations += result.evaluations
                if not result.converged and result.value >= loss:
                    # No decrease along d within the budget: rounding dominates; stop here.
                    flat.assign(start)
                    state["line_search_failed"] = True
                    break
                t = result.step
                flat.assign(start + t * direction)
                orig_loss, grad = result.payload
                loss = result.value
            else:
                t = group["lr"] * min(1.0, 1.0 / float(grad.abs().sum())) if first else group["lr"]
                flat.add_(direction, alpha=t)
                if iterations != group["max_iter"]:
                    orig_loss, loss, grad = evaluate()
                    evaluations += 1
            state["d"], state["t"] = direction, t

            if iterations == group["max_iter"] or evaluations >= group["max_eval"]:
                break
            if float(grad.abs().max()) <= group["tolerance_grad"]:
                break
            if float(direction.abs().max()) * abs(t) <= group["tolerance_change"]:
                break
            if abs(loss - previous_loss) < group["tolerance_change"]:
                break
        return orig_loss
