r"""Optimizer state in fewer bits: ``state_format`` of the optimizers whose moments it fits.

An optimizer keeps its moments (Adam's :math:`m` and :math:`v`, Lion's and SGD's momentum,
Muon's momentum) in one of these formats; everything else of its state (step counters, MARS's
last gradient, NorMuon's row moments) stays as it is:

- ``"fp32"`` (the default): torch's rule, the parameter's own dtype (float32 for float32
  parameters), untouched by this module;
- ``"bf16"``: bfloat16, rounded to nearest (2 bytes per value);
- ``"bf16-sr"``: bfloat16 with stochastic rounding: :math:`x` becomes one of its two bf16
  neighbours with probabilities that make the rounding unbiased,
  :math:`\mathbb{E}[\mathrm{sr}(x)] = x` (Gupta et al. 2015, arXiv:1502.02551), so that
  updates smaller than half a bf16 ulp of the stored value (:math:`(1-\beta_2) g^2` against
  :math:`v`, late in training) still move it on average, where round-to-nearest drops them;
- ``"8bit"``: block-wise dynamic quantisation (Dettmers et al. 2021, "8-bit Optimizers via
  Block-wise Quantization", arXiv:2110.02861): the values in row-major order, in blocks of
  :data:`BLOCK` = 256, each block divided by its largest magnitude (an fp32 ``absmax`` per
  block) and rounded to the nearest of 256 codes of the *dynamic* map
  (:func:`dynamic_map`): signed for the first moment, unsigned for the second. One byte per
  value plus 4 bytes per block.

The step dequantises each moment into a working tensor of the parameter's dtype, runs the
optimizer's own update on it unchanged (its foreach or fused path), and quantises the result
back with a fresh ``absmax`` (the scheme of bitsandbytes' CPU 8-bit optimizers). Parameters
are taken in chunks of :data:`CHUNK_ELEMENTS`, so the working copies add at most that much
memory per moment, whatever the model's size.

Stored state: ``state[key]`` holds the codes (``uint8``, the parameter's shape) or the bf16
tensor, and ``state[key + "_absmax"]`` the block scales; stochastic rounding also counts its
writes (``state["rounding_draws"]``, an int) to seed each write's draws, so that a resumed run
rounds as the uninterrupted one did. ``state_dict()`` holds these tensors as they are.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
from torch import Tensor

from gradwise.validation import check_choice

STATE_FORMATS = ("fp32", "bf16", "bf16-sr", "8bit")
"""The values of ``state_format``."""

BLOCK = 256
"""Values per block of the 8-bit format, each with its own fp32 scale (Dettmers et al. 2021)."""

CHUNK_ELEMENTS = 1 << 22
"""Parameter elements whose moments are dequantised together in one step (16 MB of float32 per moment)."""

ABSMAX_SUFFIX = "_absmax"
DRAWS_KEY = "rounding_draws"


def dynamic_map(signed: bool) -> Tensor:
    r"""The 256 values of the 8-bit dynamic data type (Dettmers 2016, arXiv:1511.04561; used per
    block by Dettmers et al. 2021), in increasing order, within :math:`[-1, 1]` (signed) or
    :math:`[0, 1]` (unsigned).

    A code is a decimal exponent and a linear fraction that share the bits: seven decades
    :math:`10^{-6}, \dots, 10^{0}`; decade :math:`i` (from the smallest, :math:`i = 0..6`) holds
    :math:`k_i = 2^i` magnitudes (unsigned: :math:`2^{i+1}`, the sign bit serves the fraction),
    the midpoints of :math:`[0.1, 1]` cut into :math:`k_i` equal intervals, times
    :math:`10^{i-6}`; signed, each with both signs. With 0 and 1 that makes 256 values, dense
    near zero (relative error about 5% in the smallest decades' ranges) and linear near 1.
    """
    magnitudes = []
    for decade in range(7):
        count = 2 ** (decade + (0 if signed else 1))
        # in float32 throughout: bit for bit bitsandbytes' map
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float32)
        magnitudes.append((edges[:-1] + edges[1:]) / 2 * 10.0 ** (decade - 6))
    values = torch.cat(magnitudes)
    if signed:
        values = torch.cat([values, -values])
    values = torch.cat([values, torch.tensor([0.0, 1.0])])
    return values.sort().values


_MAPS: dict[tuple[bool, torch.device], tuple[Tensor, Tensor]] = {}


def _map_and_bounds(signed: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """The dynamic map on ``device`` and the midpoints between its neighbouring values (cached)."""
    key = (signed, device)
    if key not in _MAPS:
        values = dynamic_map(signed).to(device)
        _MAPS[key] = values, (values[:-1] + values[1:]) / 2
    return _MAPS[key]


def _blocks(values: Tensor) -> Tensor:
    """``values`` in row-major order as rows of :data:`BLOCK`, the last one padded with zeros."""
    flat = values.reshape(-1).float()
    padding = -flat.numel() % BLOCK
    if padding:
        flat = torch.nn.functional.pad(flat, (0, padding))
    return flat.view(-1, BLOCK)


def quantize_8bit(values: Tensor, signed: bool) -> tuple[Tensor, Tensor]:
    """``(codes, absmax)``: each value's nearest code of the dynamic map after its block is divided
    by its largest magnitude; ``codes`` is ``uint8`` shaped like ``values``, ``absmax`` float32 per
    block. A block of zeros keeps the scale 0 (its codes decode to 0)."""
    bounds = _map_and_bounds(signed, values.device)[1]
    blocks = _blocks(values)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)).view(-1)[: values.numel()]
    codes = torch.bucketize(scaled.clamp(-1.0, 1.0), bounds).to(torch.uint8)  # a tensor of its own: no padding kept
    return codes.view(values.shape), absmax


def dequantize_8bit(codes: Tensor, absmax: Tensor, signed: bool, dtype: torch.dtype) -> Tensor:
    """The values that ``quantize_8bit`` encoded as ``(codes, absmax)``, in ``dtype``."""
    # index_select with int32 indices: 2.4x faster than indexing with an int64 copy (1M codes, 1 thread)
    values = _map_and_bounds(signed, codes.device)[0].index_select(0, codes.reshape(-1).int())
    padding = -values.numel() % BLOCK
    if padding:
        values = torch.nn.functional.pad(values, (0, padding))
    values = (values.view(-1, BLOCK) * absmax.unsqueeze(1)).view(-1)[: codes.numel()]
    return values.view(codes.shape).to(dtype)


def stochastic_round_bf16(values: Tensor, seed: int) -> Tensor:
    """``values`` (float32) rounded to bfloat16 stochastically: a uniform 16-bit integer, drawn
    from a generator seeded with ``seed``, added to the 16 low bits that bfloat16 drops, then
    truncated; so :math:`x` rounds up with probability (its distance to the lower neighbour) /
    (the gap). Infinities and NaNs stay what they are."""
    values = values.float().contiguous()
    generator = torch.Generator(device=values.device).manual_seed(seed)
    noise = torch.randint(0, 1 << 16, values.shape, dtype=torch.int32, device=values.device, generator=generator)
    bits = values.view(torch.int32)
    # -65536 is 0xFFFF0000: keep the sign, exponent and 7 fraction bits of the sum
    rounded = ((bits + noise) & -65536).view(torch.float32)
    rounded = torch.where(torch.isfinite(values), rounded, values)
    return rounded.to(torch.bfloat16)  # exact: the low 16 bits are zero


def draw_seed(draws: int, key: str, numel: int) -> int:
    """The seed of a tensor's ``draws``-th stochastic rounding of state ``key``: the count spread by
    an odd multiplier (the golden ratio's 32-bit fraction), the key and size mixed in, so tensors
    and moments draw apart."""
    return (draws * 0x9E3779B9 + zlib.crc32(key.encode()) * 0x85EBCA6B + numel) % 2**32


def check_state_format(optimizer_class: type, state_format: str) -> str:
    """``state_format`` if ``optimizer_class`` offers it (it names its moments); a ``ValueError``
    otherwise."""
    check_choice("state_format", state_format, STATE_FORMATS)
    if state_format != "fp32" and not getattr(optimizer_class, "_formatted_state", None):
        raise ValueError(f"state_format: {optimizer_class.__name__} keeps its state as torch does, "
                         f"only 'fp32'; got {state_format!r}")
    return state_format


def is_stored(key: str) -> bool:
    """Whether ``key`` names a formatted moment's block scales (stored beside the moment)."""
    return key.endswith(ABSMAX_SUFFIX)


class FormattedState(MutableMapping):
    """One parameter's state during a step under ``state_format``: moments named in ``signs``
    (key: whether its values are signed) read as working tensors of ``dtype``, decoded on first
    access, and written back in the format by :meth:`commit`; other keys pass through to the
    stored state."""

    def __init__(self, stored: MutableMapping, state_format: str, signs: dict[str, bool], dtype: torch.dtype) -> None:
        self.stored = stored
        self.state_format = state_format
        self.signs = signs
        self.dtype = dtype
        self.working: dict[str, Tensor] = {}

    def __getitem__(self, key: str) -> Any:
        if key not in self.signs:
            return self.stored[key]
        if key not in self.working:
            self.working[key] = self.decode(key)
        return self.working[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key in self.signs:
            self.working[key] = value
        else:
            self.stored[key] = value

    def __delitem__(self, key: str) -> None:
        self.working.pop(key, None)
        self.stored.pop(key + ABSMAX_SUFFIX, None)
        del self.stored[key]

    def __contains__(self, key: object) -> bool:
        return key in self.working or key in self.stored

    def __iter__(self) -> Iterator[str]:
        return iter([key for key in self.stored if not is_stored(key)])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def decode(self, key: str) -> Tensor:
        """The stored moment ``key`` as a working tensor: 8-bit codes and scales dequantised; a bf16
        or full-precision tensor (written under another format) converted."""
        value = self.stored[key]
        scales = self.stored.get(key + ABSMAX_SUFFIX)
        if scales is not None and value.dtype == torch.uint8:
            return dequantize_8bit(value, scales, self.signs[key], self.dtype)
        return value.to(self.dtype, copy=True)

    def commit(self) -> None:
        """Write every working moment back in the format (the 8-bit codes and scales into their
        existing storage when they have one)."""
        for key, value in self.working.items():
            if self.state_format == "8bit":
                codes, scales = quantize_8bit(value, self.signs[key])
                self._store(key, codes)
                self._store(key + ABSMAX_SUFFIX, scales)
                continue
            self.stored.pop(key + ABSMAX_SUFFIX, None)
            if self.state_format == "bf16-sr":
                draws = self.stored.get(DRAWS_KEY, 0)
                self.stored[DRAWS_KEY] = draws + 1
                self._store(key, stochastic_round_bf16(value, draw_seed(draws, key, value.numel())))
            else:
                self._store(key, value.to(torch.bfloat16))
        self.working.clear()

    def _store(self, key: str, value: Tensor) -> None:
        old = self.stored.get(key)
        if isinstance(old, Tensor) and old.dtype == value.dtype and old.shape == value.shape:
            old.copy_(value)
        else:
            self.stored[key] = value


def format_bytes(state_format: str, values: int, blocks: int, element_size: int) -> int:
    """Bytes of moments of ``values`` elements in ``blocks`` blocks (counted per buffer) stored in
    ``state_format`` (``element_size``: the parameter's bytes per value, which ``"fp32"`` keeps):
    8-bit AdamW, 2 bytes per parameter and 8 per block of 256."""
    if state_format == "fp32":
        return values * element_size
    if state_format in ("bf16", "bf16-sr"):
        return 2 * values
    return values + 4 * blocks
