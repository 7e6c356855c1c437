"""The base class of gradwise's optimizers: torch's whole optimizer contract, once.

It keeps to the ``torch.optim.Optimizer`` contract and adds what every optimizer here
shares, so that each optimizer file holds only its math:

- hyperparameters are validated before the parameters are looked at (as torch does), and
  every param group (the defaults included) when it is added: a bad value is a
  ``ValueError`` naming it; bool options must be bools (``maximize="False"`` is refused);
  a tensor ``lr`` must hold one element; ``betas`` are both floats or both tensors;
- torch's keywords keep torch's meaning: ``foreach=False`` runs the same update one
  parameter at a time (torch's single-tensor path), ``differentiable=True`` records the
  update for autograd (so gradients flow through ``step()``), ``capturable=True`` keeps
  step counters on the parameter's device and reads no scalar on the host, ``fused`` picks
  torch's fused kernel where the optimizer has one (never together with ``foreach=True``
  or ``differentiable=True``, as in torch);
- ``step()`` collects the parameters that have a gradient (skipping ``None``), resolves a
  tensor learning rate, and hands lists of tensors to ``_update``. A complex parameter is
  optimized as its ``torch.view_as_real`` (torch's rule): ``_update`` sees real views of
  the parameter, its gradient and its state, while the state is stored complex, as
  torch.optim stores it. Sparse gradients go to ``_sparse_update`` where an optimizer
  supports them (SGD, Adagrad), and raise a clear error elsewhere;
- the step counter of each parameter lives where torch keeps it, so a ``state_dict`` from
  ``torch.optim`` loads here and vice versa: a float32 scalar on the CPU for the foreach
  path (reading it is not a device synchronisation), on the parameter's device for the
  fused kernels and capturable steps, which read it there. A ``step`` saved as a Python
  number (older torch checkpoints) becomes a tensor when the next step reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _get_capturable_supported_devices

from gradwise.optim.owner_computes import whole_tensors
from gradwise.optim.param_rounding import PARAM_ROUNDINGS, float32_working_params
from gradwise.optim.sharded_formats import (
    as_dtensor_moments,
    encode_dtensor_moments,
    is_dtensor,
    local_shards,
)
from gradwise.optim.state_formats import ABSMAX_SUFFIX, CHUNK_ELEMENTS, FormattedState, check_state_format
from gradwise.validation import check_bool, check_choice, check_optional_bool, check_range

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, Tensor]]

_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Options that are switches: each must be a bool, never a truthy string or number.
_BOOL_OPTIONS = (
    "maximize", "amsgrad", "nesterov", "centered", "decoupled_weight_decay", "differentiable", "capturable",
    "line_search", "relative_step", "precondition_1d", "cautious",
)
# Options where None lets the library choose.
_OPTIONAL_BOOL_OPTIONS = ("foreach", "fused")


def check_common_options(group: dict[str, Any], optimizer_class: type) -> None:
    """The checks every optimizer (``optimizer_class``) shares: switches, keyword combinations, the
    state format, tensor lr and betas."""
    for key in _BOOL_OPTIONS:
        if key in group:
            check_bool(key, group[key])
    for key in _OPTIONAL_BOOL_OPTIONS:
        if key in group:
            check_optional_bool(key, group[key])
    if group.get("fused") and group.get("foreach"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if group.get("fused") and group.get("differentiable"):
        raise RuntimeError("`fused` does not support `differentiable`")
    if group.get("fused") and group.get("cautious"):
        raise ValueError("cautious=True masks the update, which a fused kernel computes inside: pass fused=None")
    if group.get("mars_gamma") is not None:
        check_range("mars_gamma", group["mars_gamma"], 0.0, 1.0)
    if group.get("param_rounding", "nearest") != "nearest":
        check_choice("param_rounding", group["param_rounding"], PARAM_ROUNDINGS)
        if group.get("differentiable"):
            raise ValueError(f"param_rounding={group['param_rounding']!r} rounds the parameters, which autograd "
                             "cannot differentiate: pass differentiable=False or param_rounding='nearest'")
    if "state_format" in group:
        check_state_format(optimizer_class, group["state_format"])
        if group["state_format"] != "fp32" and group.get("differentiable"):
            raise ValueError(f"state_format={group['state_format']!r} rounds the state, which autograd cannot "
                             "differentiate: pass differentiable=False or state_format='fp32'")
    lr = group.get("lr")
    if isinstance(lr, Tensor) and lr.numel() != 1:
        raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
    betas = group.get("betas")
    if isinstance(betas, (tuple, list)) and len({isinstance(beta, Tensor) for beta in betas}) > 1:
        raise ValueError(f"betas must be either both floats or both Tensors, got {betas!r}")


class RealViewState(MutableMapping):
    """A complex parameter's state seen through ``torch.view_as_real``.

    Reading a complex state tensor gives its real view (sharing memory, so in-place updates
    land in the stored tensor); storing a real tensor shaped like the parameter's real view
    stores its complex view. Scalars (step counters) pass through.
    """

    def __init__(self, state: dict[str, Any], real_shape: torch.Size) -> None:
        self._state = state
        self._real_shape = real_shape

    def __getitem__(self, key: str) -> Any:
        value = self._state[key]
        return torch.view_as_real(value) if isinstance(value, Tensor) and value.is_complex() else value

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, Tensor) and value.dim() > 0 and value.shape == self._real_shape:
            value = torch.view_as_complex(value)
        self._state[key] = value

    def __delitem__(self, key: str) -> None:
        del self._state[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._state)

    def __len__(self) -> int:
        return len(self._state)


class GradwiseOptimizer(Optimizer):
    """Base class: validated param groups and a ``step`` over lists of tensors."""

    # Options a class forces whatever a loaded state_dict says (AdamW: decoupled decay).
    _forced_options: dict[str, Any] = {}

    # Whether the update treats each parameter as a matrix (Muon, Shampoo, SOAP, Adafactor,
    # K-FAC) rather than element by element. Such an optimizer refuses complex parameters
    # (as torch's Adafactor and Muon do: a real view would add a fake axis to the matrix)
    # and leaves zero-size parameters alone (there is nothing to precondition).
    _per_matrix: bool = False

    def _updates_matrices(self, group: dict[str, Any]) -> bool:
        """Whether ``group``'s update is per matrix (see ``_per_matrix``); an optimizer that
        mixes kinds of groups (Muon with its AdamW groups) decides per group."""
        return self._per_matrix

    def __init__(self, params: ParamsT, defaults: dict[str, Any]) -> None:
        # Hyperparameters first, as torch checks them before it reads the parameters.
        check_common_options(defaults, type(self))
        self._validate_defaults(defaults)
        self._complex_owners: dict[Tensor, Tensor] = {}
        self._shard_owners: dict[Tensor, Tensor] = {}
        self._formatted_views: dict[Tensor, FormattedState] = {}
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        check_common_options(self.param_groups[-1], type(self))
        self._validate(self.param_groups[-1])
        description = getattr(type(self), "description", None)
        if getattr(description, "sharding", None) == "layer" and any(map(is_dtensor, self.param_groups[-1]["params"])):
            raise ValueError(f"{type(self).__name__} on sharded (DTensor) parameters: its factors come from each "
                             "layer's whole activations and gradients, which FSDP and tensor parallelism split; "
                             "use ddp, zero1 or zero2")

    def _validate(self, group: dict[str, Any]) -> None:
        """Raise ``ValueError`` for any invalid hyperparameter of ``group``."""
        raise NotImplementedError

    def _validate_defaults(self, defaults: dict[str, Any]) -> None:
        """Validate the constructor's hyperparameters before any parameter is read; a class
        whose defaults hold a value that only a param group resolves overrides this."""
        self._validate(defaults)

    def _update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Apply one update to ``params`` (all with gradients ``grads``) of ``group``."""
        raise NotImplementedError

    def _sparse_update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """Apply one update with sparse gradients; optimizers that support them override this."""
        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")

    # Scalar state kept in its own dtype on the CPU. torch's load_state_dict casts every
    # state tensor but "step" to its parameter's dtype, which would round such a scalar
    # (for bf16 parameters) and change the arithmetic after a resume.
    _scalar_state_keys: tuple[str, ...] = ()

    # Statistics kept in float32 for 16-bit parameters (Shampoo's factors): loaded in their
    # own dtype too, onto the parameter's device, where torch would round them to bf16.
    _float32_state_keys: tuple[str, ...] = ()

    # The moments a ``state_format`` applies to (an optimizer that offers the option), each
    # with whether its values are signed (Adam's m) or not (Adam's v): the 8-bit format
    # quantises them on different maps. See gradwise.optim.state_formats.
    _formatted_state: dict[str, bool] = {}

    # The values of ``state_format`` the optimizer offers (fp32 only without formatted moments).
    _state_formats: tuple[str, ...] = ("fp32",)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's __setstate__ (run by load_state_dict and unpickling) adds "differentiable"
        # to every optimizer's defaults; one that has no such option keeps its groups' keys.
        defaults = self.__dict__.get("defaults", state.get("defaults", {}))
        had_differentiable = "differentiable" in defaults
        super().__setstate__(state)
        if not had_differentiable:
            self.defaults.pop("differentiable", None)
        self.__dict__.setdefault("_complex_owners", {})
        self.__dict__.setdefault("_shard_owners", {})
        self.__dict__.setdefault("_formatted_views", {})

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        # a sharded parameter's formatted moments as DTensors, which load into any mesh (sharded_formats)
        params = [p for group in self.param_groups for p in group["params"]]
        as_dtensor_moments(state_dict["state"], self.param_groups, params, self._formatted_state)
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        own_dtype = (*self._scalar_state_keys, *self._float32_state_keys)
        # a moment saved in a state format keeps it (torch would cast it to the parameter's dtype)
        formatted = {i for group in state_dict["param_groups"] if group.get("state_format", "fp32") != "fp32"
                     for i in group["params"]}
        # a group that steps bf16 parameters in float32 (param_rounding) keeps its float32 state,
        # which goes with the parameter like torch's
        rounded = {i for group in state_dict["param_groups"] if group.get("param_rounding", "nearest") != "nearest"
                   for i in group["params"]}

        def with_parameter(i: int, key: str, value: Any) -> bool:
            return (key in self._float32_state_keys
                    or (i in rounded and key not in own_dtype and torch.is_tensor(value) and value.dim() > 0))

        def keeps_its_own(i: int, key: str) -> bool:
            return key in own_dtype or key.endswith(ABSMAX_SUFFIX) or (i in formatted and key in self._formatted_state)

        # tensors only: torch's sharded-checkpoint loader hands back an empty dict for a key that the fresh
        # optimizer's state has and the checkpoint does not (a sharded moment's block scales, which its
        # state_dict presents as per-value scales or not at all)
        kept = {
            i: {key: value for key, value in state_dict["state"][i].items()
                if torch.is_tensor(value) and (keeps_its_own(i, key) or with_parameter(i, key, value))}
            for i in saved_ids
            if i in state_dict["state"]
        }
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, param in zip(saved_ids, params):
            for key, value in kept.get(saved_id, {}).items():
                device = param.device if with_parameter(saved_id, key, value) else value.device
                self.state[param][key] = value.detach().to(device, copy=True)
        for group in self.param_groups:
            if group.get("state_format", "fp32") != "fp32":
                for param in filter(is_dtensor, group["params"]):
                    encode_dtensor_moments(self.state[param], param, group["state_format"], self._formatted_state)
        # A state_dict from another optimizer (say torch.optim's) may lack some options.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            group.update(self._forced_options)
            check_common_options(group, type(self))
            self._validate(group)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        directions = self._directions()
        for group in self.param_groups:
            with torch.set_grad_enabled(group.get("differentiable", False)):
                self._step_group(group, directions)
        return loss

    def _directions(self) -> dict[Tensor, Tensor]:
        """Directions that replace some parameters' gradients in this step (K-FAC's
        preconditioned gradients); computed once per step, after the closure ran."""
        return {}

    def _step_group(self, group: dict[str, Any], directions: dict[Tensor, Tensor]) -> None:
        """Sort ``group``'s gradients (dense, sparse, none) and update the parameters."""
        params, grads, sparse_params, sparse_grads = [], [], [], []
        for param in group["params"]:
            if param.grad is None:
                continue
            grad = directions.get(param, param.grad)
            if grad.is_sparse:
                sparse_params.append(param)
                sparse_grads.append(grad)
            else:
                params.append(param)
                # A strided gradient (assigned by hand) is read in its own layout only by
                # the foreach kernels; a contiguous copy serves every path.
                grads.append(grad if grad.is_contiguous() else grad.contiguous())
        if self._updates_matrices(group):
            if any(param.is_complex() for param in params):
                raise RuntimeError(f"{type(self).__name__} does not support complex parameters")
            if any(param.numel() == 0 for param in params):
                kept = [i for i, param in enumerate(params) if param.numel() > 0]
                params, grads = [params[i] for i in kept], [grads[i] for i in kept]
        # Dynamo shows every param group to the traced step with capturable=True (its
        # OptimizerVariable), whatever the device: only an eager step checks the devices.
        if group.get("capturable") and not torch.compiler.is_compiling():
            check_capturable_devices(type(self).__name__, params + sparse_params)
        group = resolve_tensor_hyperparameters(group)
        group = with_amp_scaling(group, self)
        if sparse_params:
            if group.get("state_format", "fp32") != "fp32" or group.get("param_rounding", "nearest") != "nearest":
                raise ValueError(f"{type(self).__name__}: sparse gradients step the state and the parameters as torch "
                                 "does; use state_format='fp32' and param_rounding='nearest' with them")
            self._sparse_update(group, sparse_params, sparse_grads)
        if not params:
            return
        if group.get("differentiable"):
            self._fresh_state(params)
        with float32_working_params(group, params, grads, self.param_state) as grads:
            params, grads = self._real_views(params, grads)
            if group.get("mars_gamma") is not None:
                grads = self._mars_gradients(group, params, grads)
            try:
                with self._whole_matrices(group, params, grads) as (params, grads):
                    if group.get("state_format", "fp32") != "fp32":
                        params, grads = local_shards(params, grads, self._shard_owners)
                        if not self._fused_formatted_update(group, params, grads):
                            self._formatted_update(group, params, grads)
                    elif group.get("foreach") is False or group.get("differentiable"):
                        for param, grad in zip(params, grads):  # torch's single-tensor path
                            self._update(group, [param], [grad])
                    else:
                        self._update(group, params, grads)
            finally:
                self._complex_owners.clear()
                self._shard_owners.clear()

    def _whole_matrices(self, group: dict[str, Any], params: list[Tensor],
                        grads: list[Tensor]) -> AbstractContextManager[tuple[list[Tensor], list[Tensor]]]:
        """The tensors a per-matrix update of ``group`` runs on: DTensor matrices (FSDP2, tensor
        parallelism) whole, each on the rank that owns it (:mod:`gradwise.optim.owner_computes`), their
        shards written back on leaving; ``params`` and ``grads`` as they are otherwise. A state format's
        blocks of a sharded matrix's moments are refused on DTensors."""
        if not self._updates_matrices(group) or not any(map(is_dtensor, params)):
            return nullcontext((params, grads))
        name = type(self).__name__
        if group.get("state_format", "fp32") != "fp32":
            raise ValueError(f"{name}(state_format={group['state_format']!r}) on sharded (DTensor) "
                             "parameters: its update needs whole matrices, whose formatted moments sharded "
                             "checkpoints cannot hold (they keep a sharded parameter's moments as shards of it); "
                             "use state_format='fp32' under FSDP and tensor parallelism")
        return whole_tensors(params, grads, self._shard_owners, self.state)

    def _fused_formatted_update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> bool:
        """Update ``params`` with a kernel that reads and writes ``group["state_format"]``'s stored
        moments directly (one pass over the smaller state, no working copies), and return True; or
        return False, changing nothing, where no such kernel applies: the generic
        :meth:`_formatted_update` then runs. An optimizer that has such a kernel overrides this."""
        return False

    def _formatted_update(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> None:
        """The update with the moments in ``group["state_format"]``: chunk by chunk of at most
        ``CHUNK_ELEMENTS`` parameter elements (a larger tensor alone), the moments decoded into
        working tensors, the optimizer's own update run on them (foreach or fused as the group
        says), and the result encoded back (see :mod:`gradwise.optim.state_formats`)."""
        name = type(self).__name__
        if not self._formatted_state:
            raise ValueError(f"{name} has no state_format option: its state is kept as torch keeps it")
        if any(param in self._complex_owners for param in params):
            raise ValueError(f"{name}(state_format={group['state_format']!r}) supports real parameters; "
                             "complex ones need 'fp32'")
        start = 0
        while start < len(params):
            stop, elements = start + 1, params[start].numel()
            while stop < len(params) and elements + params[stop].numel() <= CHUNK_ELEMENTS:
                elements += params[stop].numel()
                stop += 1
            chunk, chunk_grads = params[start:stop], grads[start:stop]
            self._formatted_views = {
                param: FormattedState(self._stored_state(param), group["state_format"], self._formatted_state,
                                      param.dtype, tuple(param.shape))
                for param in chunk
            }
            try:
                if group.get("foreach") is False:
                    for param, grad in zip(chunk, chunk_grads):
                        self._update(group, [param], [grad])
                else:
                    self._update(group, chunk, chunk_grads)
                for view in self._formatted_views.values():
                    view.commit()
            finally:
                self._formatted_views = {}
            start = stop

    def needs_whole_tensors(self) -> bool:
        """Whether some param group's update reads a statistic of each whole tensor (the cautious
        mask's count, MARS's norm, a state format's blocks). ZeRO then gives each rank whole tensors rather than flat
        slices of an element-wise optimizer, so that the sharded step equals the unsharded one."""
        return any(group.get("cautious") or group.get("mars_gamma") is not None
                   or group.get("state_format", "fp32") != "fp32" for group in self.param_groups)

    def _mars_beta(self, group: dict[str, Any]) -> float:
        r"""The momentum coefficient :math:`\beta_1` that scales MARS's correction: the first
        of ``betas`` (Adam's, Lion's, AdEMAMix's fast EMA)."""
        return group["betas"][0]

    def _mars_gradients(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        r"""MARS's variance-reduced gradients (Yuan et al. 2024, "MARS: Unleashing the Power of
        Variance Reduction for Training Large Models", arXiv:2411.10438, MARS-approx), which the
        optimizer then uses in place of :math:`g_t`:

        .. math::
            c_t = g_t + \gamma\,\frac{\beta_1}{1-\beta_1}\,(g_t - g_{t-1}),\qquad
            \tilde c_t = c_t / \max(1, \lVert c_t\rVert_2)

        per parameter tensor, :math:`\gamma` = ``mars_gamma``. The previous gradient is the
        state ``last_grad`` (one buffer the size of the parameter), zero before the first step
        as in pytorch_optimizer's ``MARS`` (so :math:`c_1 = (1 + \gamma\beta_1/(1-\beta_1))\,g_1`
        before clipping). The clipping divides by the norm clamped at 1: no host read.

        Done here, before ``_update``, so every optimizer that accepts ``mars_gamma`` gets it
        through one mechanism, its fused kernel included. ``maximize`` commutes with it (the
        map is odd), so the raw gradients are stored and the optimizer negates :math:`\tilde c_t`.
        The norm is the whole tensor's: ZeRO shards such a group by whole tensors
        (:meth:`needs_whole_tensors`); a DTensor's norm (FSDP2) is reduced over its shards."""
        last_grads = [self._state(p, "last_grad", zeros_like) for p in params]
        beta1 = self._mars_beta(group)
        corrected = torch._foreach_sub(grads, last_grads)
        torch._foreach_mul_(corrected, group["mars_gamma"] * beta1 / (1 - beta1))
        torch._foreach_add_(corrected, grads)
        # out of place: DTensor keeps a norm as a pending reduction, which in-place edits cannot change
        norms = torch._foreach_clamp_min(torch._foreach_norm(corrected), 1.0)
        torch._foreach_div_(corrected, norms)
        for last_grad, grad in zip(last_grads, grads):  # a loop: DTensor has no foreach copy
            last_grad.copy_(grad)
        return list(corrected)

    def _fresh_state(self, params: list[Tensor]) -> None:
        """Under ``differentiable=True``, give each state tensor a new copy before the step
        edits it in place: the previous step's recorded graph saved the old tensors (Adam's
        ``m`` in ``addcdiv``, say), which must keep the values it saw. torch clones the same
        tensors op by op; one copy per step here serves every optimizer."""
        for param in params:
            state = self.state[param]
            for key, value in state.items():
                if isinstance(value, Tensor):
                    state[key] = value.clone()

    def _real_views(self, params: list[Tensor], grads: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Complex parameters and their gradients as real views (torch's rule for complex
        parameters); their state is then reached through :meth:`param_state`."""
        if not any(param.is_complex() for param in params):
            return params, grads
        views, view_grads = [], []
        for param, grad in zip(params, grads):
            if param.is_complex():
                view = torch.view_as_real(param)
                self._complex_owners[view] = param
                param, grad = view, torch.view_as_real(grad)
            views.append(param)
            view_grads.append(grad)
        return views, view_grads

    def param_state(self, param: Tensor) -> MutableMapping:
        """The state of ``param``: for the real view of a complex parameter, its owner's state
        seen through real views; during a step in a state format, its moments as working tensors."""
        view = self._formatted_views.get(param)
        if view is not None:
            return view
        owner = self._complex_owners.get(param)
        if owner is None:
            return self._stored_state(param)
        return RealViewState(self.state[owner], param.shape)

    def _stored_state(self, param: Tensor) -> MutableMapping:
        """The state stored for ``param``: its sharded parameter's, for the local shard of a DTensor."""
        return self.state[self._shard_owners.get(param, param)]

    def _state(self, param: Tensor, key: str, make: Callable[[Tensor], Tensor]) -> Tensor:
        """The state tensor ``key`` of ``param``, created by ``make(param)`` on first use."""
        state = self.param_state(param)
        if key not in state:
            state[key] = make(param)
        return state[key]

    def _momentum_step(
        self, params: list[Tensor], directions: list[Tensor], lr: float, momentum: float, nesterov: bool = False
    ) -> None:
        r"""Heavy-ball momentum on precomputed directions :math:`d` (Shampoo's, K-FAC's):
        :math:`b \leftarrow \mu b + d`, then :math:`\theta \leftarrow \theta - \eta b`, or
        :math:`\theta - \eta (d + \mu b)` with Nesterov; a plain step when :math:`\mu = 0`.
        The buffer is the state ``momentum_buffer``, as in ``torch.optim.SGD``."""
        if momentum == 0:
            torch._foreach_add_(params, directions, alpha=-lr)
            return
        buffers = [self._state(p, "momentum_buffer", zeros_like) for p in params]
        torch._foreach_mul_(buffers, momentum)
        torch._foreach_add_(buffers, directions)
        steps = torch._foreach_add(directions, buffers, alpha=momentum) if nesterov else buffers
        torch._foreach_add_(params, steps, alpha=-lr)

    def _step_counters(self, params: list[Tensor], on_device: bool) -> list[Tensor]:
        """Each parameter's step counter (a scalar tensor), created at zero.

        ``on_device`` keeps it on the parameter's device as float32 (for fused kernels and
        capturable steps); otherwise it lives on the CPU with dtype :func:`scalar_dtype`, as in
        torch's foreach implementations.
        """
        counters = []
        for param in params:
            state = self.param_state(param)
            device = param.device if on_device else torch.device("cpu")
            step = state.get("step")
            if step is None:
                dtype = torch.float32 if on_device else scalar_dtype()
                step = state["step"] = torch.zeros((), dtype=dtype, device=device)
            elif not isinstance(step, Tensor):  # a Python number, as older torch checkpoints hold
                dtype = torch.float32 if on_device else scalar_dtype()
                step = state["step"] = torch.tensor(float(step), dtype=dtype, device=device)
            elif step.device != device:
                step = state["step"] = step.to(device)
            counters.append(step)
        return counters


def check_capturable_devices(optimizer: str, params: list[Tensor]) -> None:
    """``capturable=True`` is for steps captured in a CUDA graph: like torch, refuse it for
    parameters on a device that cannot capture (the CPU)."""
    supported = _get_capturable_supported_devices(supports_xla=False)
    devices = sorted({param.device.type for param in params} - set(supported))
    if devices:
        raise RuntimeError(
            f"{optimizer}(capturable=True) needs parameters on one of {supported}, got {', '.join(devices)}; "
            "pass capturable=False"
        )


def resolve_tensor_hyperparameters(group: dict[str, Any]) -> dict[str, Any]:
    """``group`` with a tensor ``lr`` or tensor ``betas`` read as Python numbers.

    torch accepts 1-element tensors so that a scheduler can change them in place; the
    update reads their value once per step (one host read of a 1-element tensor). Gradients
    do not flow into a tensor ``lr`` through ``differentiable=True`` (a documented
    difference from torch).
    """
    lr, betas = group.get("lr"), group.get("betas")
    beta_list = list(betas) if isinstance(betas, (tuple, list)) else []
    tensor_betas = any(isinstance(beta, Tensor) for beta in beta_list)
    if not (isinstance(lr, Tensor) or tensor_betas):
        return group
    resolved = dict(group)
    if isinstance(lr, Tensor):
        resolved["lr"] = lr.item()
    if tensor_betas:
        resolved["betas"] = tuple(beta.item() if isinstance(beta, Tensor) else beta for beta in beta_list)
    return resolved


AMP_SCALING_KEYS = ("grad_scale", "found_inf")


def with_amp_scaling(group: dict[str, Any], optimizer: Optimizer) -> dict[str, Any]:
    """``group`` with the optimizer's ``grad_scale``/``found_inf`` tensors, where a caller set
    them (torch's protocol for fused kernels: ``GradScaler`` or a hand-written loop). The fused
    kernels then unscale the gradients and skip the whole update when ``found_inf`` is 1;
    the other paths ignore them, as torch's do."""
    scaling = {key: getattr(optimizer, key) for key in AMP_SCALING_KEYS if getattr(optimizer, key, None) is not None}
    return {**group, **scaling} if scaling else group


def fused_scaling(group: dict[str, Any]) -> dict[str, Tensor | None]:
    """The keyword arguments ``grad_scale`` and ``found_inf`` of torch's fused kernels."""
    return {key: group.get(key) for key in AMP_SCALING_KEYS}


def undo_skipped_steps(steps: list[Tensor], group: dict[str, Any]) -> None:
    """A fused kernel that found an inf skipped the update: take back the step count (as torch)."""
    found_inf = group.get("found_inf")
    if found_inf is not None:
        torch._foreach_sub_(steps, [found_inf] * len(steps))


def lr_value(group: dict[str, Any]) -> float:
    """``group``'s learning rate as a number, for optimizers that drive their own step (a
    1-element tensor ``lr`` is read; updating it in place must not change the group's)."""
    lr = group["lr"]
    return lr.item() if isinstance(lr, Tensor) else lr


def scalar_values(scalars: list[Tensor], group: dict[str, Any]) -> list[Any]:
    """Scalar state (step counts, running products) for the update arithmetic: Python
    numbers normally (these scalars live on the CPU, so reading them costs nothing), the
    tensors themselves under ``torch.compile`` (no graph break) or ``capturable`` (no host
    synchronisation); the arithmetic is written to take either."""
    if group.get("capturable") or torch.compiler.is_compiling():
        return list(scalars)
    return [scalar.item() for scalar in scalars]


def addcdiv_scaled_(
    params: list[Tensor], numerators: list[Tensor], denominators: list[Tensor], scales: list[Any]
) -> None:
    """``params[i] += scales[i] * numerators[i] / denominators[i]`` in place.

    ``scales`` are numbers, or 0-d tensors (see :func:`scalar_values`); torch's foreach
    kernels take per-tensor scalars only as numbers, so tensor scales divide the
    denominators instead (as torch's capturable paths do).
    """
    if scales and isinstance(scales[0], Tensor):
        torch._foreach_addcdiv_(params, numerators, torch._foreach_div(denominators, scales))
    else:
        torch._foreach_addcdiv_(params, numerators, denominators, scales)


def check_state_shapes(optimizer: str, params: list[Tensor], *states: list[Tensor]) -> None:
    """Refuse element-wise state shaped unlike its parameter before a fused kernel runs.

    torch's fused kernels index state and parameter alike without checking, so a state
    loaded from other parameters corrupts the heap; torch's default path raises instead.
    """
    for column in states:
        for param, state in zip(params, column):
            if state.shape != param.shape:
                raise RuntimeError(
                    f"{optimizer}: a state tensor of shape {tuple(state.shape)} belongs to a parameter of shape "
                    f"{tuple(param.shape)}; was the state_dict saved for other parameters?"
                )


def scalar_dtype() -> torch.dtype:
    """The dtype of scalar state (step counters, running products): float64 when that is
    torch's default dtype, float32 otherwise, as torch.optim does."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def zeros_like(param: Tensor) -> Tensor:
    """A zero state tensor shaped and placed like ``param``."""
    return torch.zeros_like(param, memory_format=torch.preserve_format)


def by_device_and_dtype(*tensor_lists: list[Any]) -> Iterator[tuple[list[Any], ...]]:
    """Split parallel tensor lists into sublists that share a device and a dtype.

    ``torch._foreach_*`` kernels and fused kernels need each call's tensors on one device
    with one dtype; the grouping key is the first list's tensors (the other lists may hold
    anything parallel to them: flags, optional buffers).
    """
    first = tensor_lists[0]
    if all(t.device == first[0].device and t.dtype == first[0].dtype for t in first):
        yield tensor_lists
        return
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for index, tensor in enumerate(first):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    for indices in groups.values():
        yield tuple([tensors[i] for i in indices] for tensors in tensor_lists)


def fused_kernel_applies(
    group: dict[str, Any],
    params: list[Tensor],
    optimizer: str,
    dtensors: bool = False,
    cpu_dtypes: tuple[torch.dtype, ...] = _FUSED_DTYPES,
) -> bool:
    """Whether ``group``'s ``fused`` option and ``params`` select torch's fused kernel.

    ``fused=None`` (the default) uses it when every parameter is a dense, contiguous
    floating-point tensor on a CPU or CUDA device, unless the group asks for torch's
    single-tensor path (``foreach=False``), a differentiable or capturable step, or the step
    is being compiled (inductor fuses the foreach path itself, and cannot trace the fused
    kernel). ``fused=True`` demands it; ``fused=False`` never uses it. DTensors (FSDP2
    shards) qualify only where ``dtensors`` says torch registers the kernel for them
    (Adam's and AdamW's); elsewhere they take the foreach path.

    ``cpu_dtypes`` are the dtypes whose CPU kernel computes the update correctly: torch's fused
    CPU SGD kernel is wrong for bfloat16 and float16 (one plain step on a (64, 33) bf16 tensor is
    0.41 off the exact result, the foreach path 0.008; tests/test_torch_kernel_findings.py), so
    SGD names float32 and float64 only.

    Strided parameters never take it: torch's fused CPU kernels index a strided parameter as
    if it were contiguous (torch's own ``Adam(fused=True)`` is off by 0.42 after three steps
    on ``base[:, ::2]``), so they go to the foreach path, which respects strides.
    """
    fused = group["fused"]
    if fused is False:
        return False
    if fused is None and (
        group.get("foreach") is False
        or group.get("cautious")
        or group.get("differentiable")
        or group.get("capturable")
        or torch.compiler.is_compiling()
    ):
        return False
    supported = all(
        p.device.type in ("cpu", "cuda") and p.dtype in (cpu_dtypes if p.device.type == "cpu" else _FUSED_DTYPES)
        and not torch.is_complex(p)
        and (dtensors or not is_dtensor(p))
        and (is_dtensor(p) or p.is_contiguous())
        for p in params
    )
    if fused and not supported:
        raise RuntimeError(
            f"{optimizer}(fused=True) needs dense, contiguous parameters on a CPU or CUDA device (not DTensors), "
            f"of dtype {', '.join(str(d).removeprefix('torch.') for d in cpu_dtypes)} on the CPU; "
            "pass fused=None to fall back to the foreach path"
        )
    return supported


# Elements per cache block on the CPU: 2^18 fp32 values are 1 MiB per tensor, so the few
# tensors and temporaries of one block stay in the L2/L3 caches between foreach passes.
CPU_BLOCK_NUMEL = 2**18


def cache_blocks(
    *columns: list, block_numel: int = CPU_BLOCK_NUMEL, whole_tensors: bool = False
) -> Iterator[tuple[list, ...]]:
    """Cut parallel per-parameter columns into blocks of about ``block_numel`` elements.

    A chain of ``torch._foreach_*`` passes over all parameters streams every tensor and
    temporary through main memory once per pass; on a CPU, running the chain block by block
    keeps them in cache (on a 2-core EPYC it halves RMSprop's step time). Large contiguous
    tensors are split into flat views (updates through the views land in the tensors);
    small ones are gathered until a block is full. Columns that are not tensors (per-parameter
    step sizes, say) are repeated for each piece of their parameter. ``whole_tensors`` never
    cuts a tensor (an update that reads a statistic of each tensor, the cautious mask's count,
    needs all of it in one block). On other devices the
    columns are yielded whole: a GPU foreach kernel already covers every tensor in one launch;
    so are DTensors, whose flat views would need communication.
    """
    if not columns[0] or columns[0][0].device.type != "cpu" or is_dtensor(columns[0][0]):
        yield columns
        return
    block: list[list] = [[] for _ in columns]
    filled = 0
    for row in zip(*columns):
        tensors = [x for x in row if isinstance(x, Tensor)]
        numel = row[0].numel()
        if not whole_tensors and numel > block_numel and all(t.is_contiguous() and t.numel() == numel for t in tensors):
            splits = [x.view(-1).split(block_numel) if isinstance(x, Tensor) else None for x in row]
            count = -(-numel // block_numel)  # as many pieces as split() cuts each tensor of the row into
            pieces = [[x] * count if parts is None else parts for x, parts in zip(row, splits)]
        else:
            pieces = [[x] for x in row]
        for piece in zip(*pieces):
            for column, value in zip(block, piece):
                column.append(value)
            filled += piece[0].numel()
            if filled >= block_numel:
                yield tuple(block)
                block, filled = [[] for _ in columns], 0
    if block[0]:
        yield tuple(block)


def roots_to_edit(tensors: list[Tensor] | tuple[Tensor, ...], differentiable: bool) -> list[Tensor]:
    """Element-wise square roots that the caller goes on to modify in place (adding eps,
    dividing by a bias correction). The backward of a square root reads its output, so under
    ``differentiable=True`` the edits go to a copy rather than to the recorded output."""
    roots = torch._foreach_sqrt(tensors)
    return [root.clone() for root in roots] if differentiable else list(roots)


def cautious_updates(updates: list[Tensor] | tuple[Tensor, ...], grads: list[Tensor]) -> list[Tensor]:
    r"""Cautious updates (Liang et al. 2024, "Cautious Optimizers: Improving Training with One
    Line of Code", arXiv:2411.16085): the coordinates of each update tensor :math:`u` whose sign
    disagrees with the gradient's are zeroed, and the rest rescaled to keep the update's size,

    .. math:: u \leftarrow u \circ \phi \cdot \frac{d}{\lVert\phi\rVert_0 + 1},\qquad
              \phi = \mathbb{1}[u \circ g > 0],

    :math:`d` the tensor's number of elements (the authors' code, and pytorch_optimizer's
    ``apply_cautious``; the +1 keeps an all-zero mask finite). Returns new tensors (the
    ``updates`` may be state, such as a momentum buffer). Each optimizer that takes
    ``cautious=True`` calls this on its update direction before the learning rate scales it
    and before decoupled weight decay, which is not masked. The mask's count is summed in at
    least float32 (exact for a 16-bit tensor too); the tensors share one dtype, as the foreach
    lists of :func:`by_device_and_dtype` do."""
    masks = torch._foreach_mul(updates, grads)
    torch._foreach_sign_(masks)
    torch._foreach_clamp_min_(masks, 0.0)  # 1 where the signs agree, 0 elsewhere
    if not masks:
        return []
    # out of place: DTensor keeps a norm as a pending reduction, which in-place edits cannot change
    counts = torch._foreach_norm(masks, 1, dtype=torch.promote_types(masks[0].dtype, torch.float32))
    scales = torch._foreach_reciprocal(torch._foreach_add(counts, 1.0))
    scales = torch._foreach_mul(scales, [float(mask.numel()) for mask in masks])
    torch._foreach_mul_(masks, [scale.to(mask.dtype) for scale, mask in zip(scales, masks)])
    return list(torch._foreach_mul(updates, masks))


def mars_buffers(options: MutableMapping[str, Any] | dict[str, Any]) -> int:
    """Buffers of the size of the parameter that MARS adds to its state: the previous gradient
    (``last_grad``) when ``mars_gamma`` is set, for the optimizers' memory rules."""
    return 0 if options.get("mars_gamma") is None else 1


def maybe_negate(grads: list[Tensor], maximize: bool) -> list[Tensor]:
    """``-grads`` (new tensors) when maximizing, else ``grads`` unchanged."""
    return list(torch._foreach_neg(grads)) if maximize else grads


def with_l2_penalty(grads: list[Tensor], params: list[Tensor], weight_decay: float) -> list[Tensor]:
    """``grads + weight_decay * params`` (classic L2 weight decay, coupled to the gradient)."""
    if weight_decay == 0:
        return grads
    return list(torch._foreach_add(grads, params, alpha=weight_decay))


def apply_weight_decay(
    params: list[Tensor], grads: list[Tensor], lr: float, weight_decay: float, decoupled: bool
) -> list[Tensor]:
    """Weight decay either way; returns the gradients to use.

    Decoupled (Loshchilov & Hutter 2019): shrink the parameters in place by
    ``1 - lr * weight_decay`` and keep the gradients. Coupled: add the L2 penalty's gradient.
    """
    if not decoupled:
        return with_l2_penalty(grads, params, weight_decay)
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    return grads
