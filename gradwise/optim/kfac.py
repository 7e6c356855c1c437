"""K-FAC: natural-gradient steps with Kronecker-factored Fisher blocks, built from a model."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradwise.optim.base import GradwiseOptimizer, ParamsT
from gradwise.optim.description import Description, Preset, StateSize, numel
from gradwise.validation import check_int, check_range

LAYERS = (nn.Linear, nn.Conv2d)


def _kfac_state(shape, options) -> StateSize:
    """Martens & Grosse 2015 (arXiv:1503.05671): per ``nn.Linear``/``nn.Conv2d`` weight
    (d_out x d_in, d_in counting the kernel), the factors A ((d_in + 1)^2 with the bias
    folded in) and G (d_out^2) and their damped inverses; biases, norms and other vectors
    keep none; a momentum buffer for every tensor when ``momentum > 0``. The rule assumes
    that every tensor of two or more dimensions is such a layer's weight with a bias (the
    default of both layers): a bias-free layer has d_in^2 in A, an embedding no factors."""
    factors = 0
    if len(shape) >= 2:
        fan_in = numel(shape[1:]) + 1
        factors = 2 * (fan_in * fan_in + shape[0] * shape[0])
    momentum = numel(shape) if options.get("momentum", 0.0) != 0 else 0
    return StateSize(factors + momentum)


class KFAC(GradwiseOptimizer):
    r"""K-FAC, Kronecker-Factored Approximate Curvature (Martens & Grosse 2015, "Optimizing
    Neural Networks with Kronecker-factored Approximate Curvature", arXiv:1503.05671;
    convolutions as in Grosse & Martens 2016, KFC, arXiv:1602.01407).

    For a layer :math:`s = W \bar a` (:math:`\bar a` the input with a 1 appended for the
    bias), the Fisher block of :math:`W` is approximated by :math:`A \otimes G` with

    .. math::
        A = \mathbb{E}[\bar a \bar a^\top],\qquad G = \mathbb{E}[g g^\top],\qquad
        g = \partial \ell / \partial s \ \text{(per example)},

    kept as running averages :math:`A \leftarrow \rho A + (1-\rho) \hat A` (``stat_decay``
    :math:`\rho`; the first batch initialises them). The statistics are gathered on steps
    :math:`0, k, 2k, \dots` only (``stats_every`` :math:`= k`), amortising their cost over
    steps as section 8 of the paper does for the inverses; on the other steps the hooks
    record nothing and the step preconditions with the factors it has. After every
    ``inverse_every``-th factor update (every ``stats_every * inverse_every``
    steps) the damped inverses are recomputed with factored Tikhonov damping,
    :math:`(A + \pi\sqrt\gamma I)^{-1}` and :math:`(G + \sqrt\gamma/\pi\, I)^{-1}`,
    :math:`\pi = \sqrt{(\operatorname{tr}A/\dim A) / (\operatorname{tr}G/\dim G)}`
    (section 6.3), and the step is

    .. math::
        \Delta = (G + \tfrac{\sqrt\gamma}{\pi} I)^{-1}\,[\nabla_W, \nabla_b]\,(A + \pi\sqrt\gamma I)^{-1},\qquad
        B \leftarrow \mu B + \Delta,\qquad \theta \leftarrow \theta - \eta B.

    ``weight_decay`` :math:`\lambda` is decoupled, as in AdamW (Loshchilov & Hutter 2019):
    :math:`\theta \leftarrow (1 - \eta\lambda)\theta` before the step, not an L2 term in the
    gradient, whose preconditioning would scale the decay by the inverse curvature (strong
    where the curvature is small) and mix it into the momentum; a param group's own
    ``weight_decay`` (0 for biases and gains in :func:`~gradwise.optim.weight_decay_groups`)
    is honoured. Parameters outside ``nn.Linear``/``nn.Conv2d`` layers (norms, embeddings,
    an output layer tied by reuse in ``forward``) take plain (momentum) SGD steps with their
    gradient.

    The factors are kept in float32 (float64 for a float64 model) whatever the dtype of the
    forward pass: under bf16/fp16 autocast the recorded inputs and output gradients are
    half-precision, whose 8 (or 11) bits of mantissa cannot carry a running covariance, and
    ``torch.linalg.cholesky`` does not take them. The direction is cast back to the
    parameter's dtype.

    How the statistics are gathered: the optimizer registers a forward hook on every
    ``nn.Linear`` and ``nn.Conv2d`` of ``model`` that records the layer's input (in training
    mode, with gradients enabled) and hooks the layer's output tensor, whose gradient the
    backward pass then hands over, scaled by the batch size :math:`N` so that a mean-reduced loss gives
    per-example gradients. The statistics of the last backward pass are folded into the
    running factors at the next ``step()``. With the loss's own labels this is the
    *empirical* Fisher; for the true Fisher (the paper's), backpropagate a loss on labels
    sampled from the model's predictive distribution first, with
    :meth:`capture_fisher`, e.g. (a classifier)::

        opt = gradwise.optim.KFAC(model, lr=1e-2, damping=1e-3, momentum=0.9)
        for x, y in loader:
            logits = model(x)
            with opt.capture_fisher():       # G from sampled labels, .grad untouched
                sampled = torch.distributions.Categorical(logits=logits.detach()).sample()
                opt.fisher_backward(F.cross_entropy(logits, sampled))
            F.cross_entropy(logits, y).backward()
            opt.step(); opt.zero_grad()

    Without ``capture_fisher`` it is one line more than any optimizer:
    ``opt = KFAC(model); loss.backward(); opt.step()``. Pass ``params`` (parameters or
    param groups, all of them ``model``'s) to choose groups; the default is all of
    ``model``'s trainable parameters. ``remove_hooks()`` detaches the optimizer from the
    model.

    State per layer with :math:`d_{in}` inputs (plus bias) and :math:`d_{out}` outputs:
    :math:`A`, :math:`G` and their inverses, :math:`2(d_{in}^2 + d_{out}^2)` values, and the
    momentum buffer (4 bytes per fp32 parameter) when ``momentum > 0``.
    """

    _per_matrix = True

    description = Description(
        drive="model",
        sharding="layer",  # a weight and its bias share the layer's factors
        state=_kfac_state,
        # training: bound to the run's model (drive "model"), the class defaults
        presets={"kfac": Preset("K-FAC (Kronecker-factored curvature of a model's layers)", train={}, lr_scale=5.0)},
    )

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-2,
        damping: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        *,
        stat_decay: float = 0.95,
        inverse_every: int = 10,
        stats_every: int = 1,
        params: ParamsT | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_int("stats_every", stats_every, 1)
        defaults = dict(
            lr=lr,
            damping=damping,
            momentum=momentum,
            weight_decay=weight_decay,
            stat_decay=stat_decay,
            inverse_every=inverse_every,
        )
        trainable = [p for p in model.parameters() if p.requires_grad]
        super().__init__(trainable if params is None else params, defaults)
        owned = {id(p) for p in model.parameters()}
        if any(id(p) not in owned for group in self.param_groups for p in group["params"]):
            raise ValueError("params must be parameters of model")
        self.model = model
        self.stats_every = stats_every
        self.steps_taken = 0  # step() calls so far: the statistics schedule
        self._reset_batch_statistics()
        for layer in self.layers:
            layer.register_forward_hook(self._record_layer)

    @property
    def layers(self) -> list[nn.Linear | nn.Conv2d]:
        """The model's layers K-FAC preconditions (``nn.Linear``, ``nn.Conv2d``)."""
        return [m for m in self.model.modules() if isinstance(m, LAYERS)]

    def _reset_batch_statistics(self) -> None:
        self._pending: dict[nn.Module, dict[str, Tensor]] = {}
        self._fisher_captured: set[nn.Module] = set()
        self._capturing_fisher = False

    def __getstate__(self) -> dict[str, Any]:
        # torch keeps defaults, state and param groups; K-FAC is also bound to its model. The
        # hooks live in the model's layers and travel with it (bound to the copy), so a deep
        # copy or a pickle of the optimizer, with or without its model, continues as it would.
        return {**super().__getstate__(), "model": self.model, "stats_every": self.stats_every,
                "steps_taken": self.steps_taken}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._reset_batch_statistics()

    def _validate(self, group: dict[str, Any]) -> None:
        check_range("lr", group["lr"], 0.0)
        check_range("damping", group["damping"], 0.0, low_open=True)
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_range("weight_decay", group["weight_decay"], 0.0)
        check_range("stat_decay", group["stat_decay"], 0.0, 1.0, high_open=True)
        check_int("inverse_every", group["inverse_every"], 1)

    @property
    def stats_due(self) -> bool:
        """Whether the hooks record statistics for the coming ``step()`` (a sampled-label
        :meth:`fisher_backward` is only worth its cost when this holds)."""
        return self.steps_taken % self.stats_every == 0

    def restricted_to(self, params: ParamsT) -> KFAC:
        """A K-FAC with this one's hyperparameters over ``params`` only (a subset of the model's
        parameters or param groups), which takes over recording the model's layers: this one's
        hooks are removed. ZeRO gives each rank the layers it owns this way."""
        self.remove_hooks()
        return KFAC(self.model, stats_every=self.stats_every, params=params)

    def remove_hooks(self) -> None:
        """Stop recording statistics of the model's layers."""
        for layer in self.layers:
            for key, hook in list(layer._forward_hooks.items()):
                if getattr(hook, "__self__", None) is self:
                    del layer._forward_hooks[key]

    # Statistics of one batch, recorded by the hooks.

    def _record_layer(self, layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        """Forward hook: keep the input, and hook the output's gradient."""
        if self.stats_due and layer.training and torch.is_grad_enabled() and output.requires_grad:
            self._pending[layer] = {"input": inputs[0].detach()}
            output.register_hook(lambda grad, layer=layer: self._record_output_grad(layer, grad))

    def _record_output_grad(self, layer: nn.Module, grad_output: Tensor) -> None:
        if layer in self._fisher_captured and not self._capturing_fisher:
            return  # keep the sampled-label statistics of this step
        pending = self._pending[layer]
        pending["A"], pending["G"] = input_output_factors(layer, pending["input"], grad_output.detach())
        if self._capturing_fisher:
            self._fisher_captured.add(layer)

    def pending_factors(self) -> dict[nn.Module, tuple[Tensor, Tensor]]:
        r"""The factors :math:`(\hat A, \hat G)` of the last backward pass, by layer, that the
        next ``step()`` folds into the running averages.

        For data parallelism: each rank's are means over its own rows of the batch, so
        averaging them over the ranks in place before ``step()`` gives the factors of the
        global batch (:class:`gradwise.distributed.strategies.zero_optimizer.ZeroOptimizer` does). Empty on steps
        when the statistics are not due (:attr:`stats_due`), on every rank alike.
        """
        return {layer: (pending["A"], pending["G"]) for layer, pending in self._pending.items() if "A" in pending}

    class _Capture:
        def __init__(self, optimizer: KFAC) -> None:
            self.optimizer = optimizer

        def __enter__(self) -> KFAC:
            self.optimizer._capturing_fisher = True
            return self.optimizer

        def __exit__(self, *exc: object) -> None:
            self.optimizer._capturing_fisher = False

    def capture_fisher(self) -> KFAC._Capture:
        """A context in which backward passes give the factor :math:`G` for the next step;
        the loss's own backward afterwards then only provides the gradient."""
        return KFAC._Capture(self)

    def fisher_backward(self, sampled_loss: Tensor) -> None:
        """Backpropagate ``sampled_loss`` (a loss on labels drawn from the model) for the
        hooks only: the graph is kept for the real loss and no ``.grad`` changes."""
        leaves = [p for layer in self.layers for p in layer.parameters() if p.requires_grad]
        torch.autograd.grad(sampled_loss, leaves, retain_graph=True, allow_unused=True)

    # The step.

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - the base class documents it
        loss = super().step(closure)
        self._pending.clear()
        self._fisher_captured.clear()
        self.steps_taken += 1
        return loss

    def _directions(self) -> dict[Tensor, Tensor]:
        return self._preconditioned_gradients()

    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict plus ``steps_taken``, so a resumed run keeps the statistics schedule."""
        return {**super().state_dict(), "steps_taken": self.steps_taken}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; one without ``steps_taken`` (torch's layout, a
        consolidated ZeRO one) restarts the statistics schedule at step 0."""
        self.steps_taken = state_dict.get("steps_taken", 0)
        super().load_state_dict(state_dict)

    def _preconditioned_gradients(self) -> dict[Tensor, Tensor]:
        directions: dict[Tensor, Tensor] = {}
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        for layer in self.layers:
            weight, bias = layer.weight, layer.bias
            group = group_of.get(id(weight))
            if group is None or weight.grad is None:
                continue
            state = self.state[weight]
            pending = self._pending.get(layer, {})
            if "A" in pending:
                decay = group["stat_decay"]
                for key in ("A", "G"):
                    if key in state:
                        state[key].lerp_(pending[key], 1 - decay)
                    else:
                        state[key] = pending[key].clone()
                state["factor_updates"] = state.get("factor_updates", 0) + 1
            if "A" not in state:
                continue  # no statistics yet (the layer ran in eval mode): plain gradient
            if (state["factor_updates"] - 1) % group["inverse_every"] == 0 and pending:
                state["A_inv"], state["G_inv"] = damped_inverses(state["A"], state["G"], group["damping"])
            dtype = state["A_inv"].dtype
            gradient = weight.grad.reshape(weight.shape[0], -1).to(dtype)
            if bias is not None:
                bias_grad = bias.grad if bias.grad is not None else torch.zeros_like(bias)
                gradient = torch.cat([gradient, bias_grad.to(dtype).unsqueeze(1)], dim=1)
            direction = (state["G_inv"] @ gradient @ state["A_inv"]).to(weight.dtype)
            if bias is not None:
                directions[bias] = direction[:, -1].reshape(bias.shape)
                direction = direction[:, :-1]
            directions[weight] = direction.reshape(weight.shape)
        return directions

    def _update(self, group: dict[str, Any], params: list[Tensor], directions: list[Tensor]) -> None:
        lr, momentum = group["lr"], group["momentum"]
        if group["weight_decay"] != 0:  # decoupled, as AdamW
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
        self._momentum_step(params, directions, lr, momentum)


def input_output_factors(layer: nn.Module, inputs: Tensor, grad_outputs: Tensor) -> tuple[Tensor, Tensor]:
    r"""The factors :math:`\hat A, \hat G` of one batch for ``layer`` (Linear or Conv2d).

    Linear: :math:`\hat A = \bar a^\top \bar a / N` over the :math:`N` rows of the input
    (leading dimensions flattened), :math:`\hat G = (N g)^\top (N g) / N`. Conv2d (KFC):
    :math:`\bar a` are the :math:`T` unfolded patches of each example, :math:`\hat A` sums
    over positions and averages over examples, :math:`\hat G` averages over both.
    """
    if isinstance(layer, nn.Conv2d):
        batch = inputs.shape[0]
        if isinstance(layer.padding, str):
            raise ValueError(f"K-FAC unfolds Conv2d patches with numeric padding, got padding={layer.padding!r}")
        patches = F.unfold(inputs, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                           stride=layer.stride)
        a = patches.transpose(1, 2).reshape(-1, patches.shape[1])  # (N T, C kh kw)
        g = grad_outputs.permute(0, 2, 3, 1).reshape(-1, grad_outputs.shape[1])  # (N T, out)
        a_scale, g_scale = 1.0 / batch, batch * batch / g.shape[0]
    else:
        a = inputs.reshape(-1, inputs.shape[-1])
        g = grad_outputs.reshape(-1, grad_outputs.shape[-1])
        a_scale, g_scale = 1.0 / a.shape[0], float(a.shape[0])
    # float32 at least: a bf16/fp16 forward records half-precision tensors (see KFAC)
    dtype = torch.promote_types(torch.promote_types(a.dtype, g.dtype), torch.float32)
    a, g = a.to(dtype), g.to(dtype)
    if layer.bias is not None:
        a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
    return (a.T @ a) * a_scale, (g.T @ g) * g_scale


def damped_inverses(A: Tensor, G: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    r"""Factored Tikhonov damping (Martens & Grosse 2015, section 6.3):
    :math:`((A + \pi\sqrt\gamma I)^{-1}, (G + \sqrt\gamma/\pi\, I)^{-1})`."""
    trace_a = A.diagonal().mean().clamp(min=torch.finfo(A.dtype).tiny)
    trace_g = G.diagonal().mean().clamp(min=torch.finfo(G.dtype).tiny)
    pi = (trace_a / trace_g).sqrt()
    root = math.sqrt(damping)
    eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    eye_g = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return (
        torch.cholesky_inverse(torch.linalg.cholesky(A + (pi * root) * eye_a)),
        torch.cholesky_inverse(torch.linalg.cholesky(G + (root / pi) * eye_g)),
    )
