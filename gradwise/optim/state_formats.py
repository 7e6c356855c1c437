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
- ``"4bit"``: the 4-bit state of Li et al. 2023 ("Memory Efficient Optimizers with 4-bit
  States", arXiv:2309.01507), two codes per byte. The first moment in blocks of
  :data:`BLOCK_4BIT` = 128 on the signed 4-bit dynamic map (:func:`dynamic_map` with three
  decades); the second moment on the linear map without zero, :math:`\{1, \dots, 16\}/16`
  (:func:`linear_map_4bit`: a zero code would make :math:`m/\sqrt{v}` explode for entries whose
  :math:`v` rounds to it), scaled by *rank-1 normalisation* for a tensor of two or more
  dimensions: entry :math:`(i_1, \dots, i_k)` is divided by :math:`\min_d M_d[i_d]`, where
  :math:`M_d` holds the largest value along every other dimension (one fp32 scale per row, per
  column, ...), which tracks outlier rows and columns that a block's single scale would
  spread; a vector's second moment is scaled per block of 128. Half a byte per value plus the
  scales (torchao's 4-bit AdamW uses the same maps with per-block scales for both moments).

The step dequantises each moment into a working tensor of the parameter's dtype, runs the
optimizer's own update on it unchanged (its foreach or fused path), and quantises the result
back with a fresh ``absmax`` (the scheme of bitsandbytes' CPU 8-bit optimizers). Parameters
are taken in chunks of :data:`CHUNK_ELEMENTS`, so the working copies add at most that much
memory per moment, whatever the model's size.

Stored state: ``state[key]`` holds the codes (``uint8``: the parameter's shape for 8 bits; for
4 bits a flat tensor of ``ceil(n / 2)`` bytes, code :math:`2j` in the low half of byte :math:`j`)
or the bf16 tensor, and ``state[key + "_absmax"]`` the scales (per block, or the rank-1 maxima
one dimension after another); stochastic rounding also counts its
writes (``state["rounding_draws"]``, an int) to seed each write's draws, so that a resumed run
rounds as the uninterrupted one did. ``state_dict()`` holds these tensors as they are.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, MutableMapping
from typing import Any

import torch
from torch import Tensor

from gradwise.validation import check_choice

STATE_FORMATS = ("fp32", "bf16", "bf16-sr", "8bit", "4bit")
"""The values of ``state_format``: all of them offered by Adam and AdamW."""

MOMENTUM_STATE_FORMATS = ("fp32", "bf16", "bf16-sr", "8bit")
"""The formats of an optimizer whose update follows its momentum's direction (SGD, Lion, Muon):
no 4 bits, which Li et al. 2023 define for Adam's moments, where the update divides :math:`m` by the
square root of :math:`v`; the signed 4-bit map has 7 magnitudes per sign, a coarse direction."""

BLOCK = 256
"""Values per block of the 8-bit format, each with its own fp32 scale (Dettmers et al. 2021)."""

BLOCK_4BIT = 128
"""Values per block of the 4-bit format's block-wise scales (Li et al. 2023)."""

CHUNK_ELEMENTS = 1 << 22
"""Parameter elements whose moments are dequantised together in one step (16 MB of float32 per moment)."""

ABSMAX_SUFFIX = "_absmax"
DRAWS_KEY = "rounding_draws"


def dynamic_map(signed: bool, decades: int = 7) -> Tensor:
    r"""The values of the dynamic data type (Dettmers 2016, arXiv:1511.04561; used per block by
    Dettmers et al. 2021), in increasing order, within :math:`[-1, 1]` (signed) or :math:`[0, 1]`
    (unsigned): 256 of them with the default seven decades (8 bits), 16 with three (the signed
    4-bit map of Li et al. 2023).

    A code is a decimal exponent and a linear fraction that share the bits: decades
    :math:`10^{1-D}, \dots, 10^{0}` for ``decades`` :math:`= D`; decade :math:`i` (from the
    smallest, :math:`i = 0..D-1`) holds :math:`k_i = 2^i` magnitudes (unsigned: :math:`2^{i+1}`,
    the sign bit serves the fraction), the midpoints of :math:`[0.1, 1]` cut into :math:`k_i`
    equal intervals, times :math:`10^{i+1-D}`; signed, each with both signs. With 0 and 1 that
    makes :math:`2^{D+1}` values, dense near zero (relative error about 5% in the smallest
    decades' ranges with 8 bits) and linear near 1.
    """
    magnitudes = []
    for decade in range(decades):
        count = 2 ** (decade + (0 if signed else 1))
        # in float32 throughout: bit for bit bitsandbytes' map
        edges = torch.linspace(0.1, 1.0, count + 1, dtype=torch.float32)
        magnitudes.append((edges[:-1] + edges[1:]) / 2 * 10.0 ** (decade + 1 - decades))
    values = torch.cat(magnitudes)
    if signed:
        values = torch.cat([values, -values])
    values = torch.cat([values, torch.tensor([0.0, 1.0])])
    return values.sort().values


def linear_map_4bit() -> Tensor:
    """The 4-bit format's second-moment map: :math:`(j + 1) / 16` for :math:`j = 0..15`, no zero."""
    return torch.arange(1, 17, dtype=torch.float32) / 16


_MAPS: dict[tuple[str, bool, torch.device], tuple[Tensor, Tensor]] = {}


def _map_and_bounds(state_format: str, signed: bool, device: torch.device) -> tuple[Tensor, Tensor]:
    """The code values of ``state_format``'s map for signed or unsigned moments, on ``device``, and
    the midpoints between neighbouring values (cached)."""
    key = (state_format, signed, device)
    if key not in _MAPS:
        if state_format == "8bit":
            values = dynamic_map(signed)
        else:
            values = dynamic_map(True, decades=3) if signed else linear_map_4bit()
        values = values.to(device)
        _MAPS[key] = values, (values[:-1] + values[1:]) / 2
    return _MAPS[key]


def _blocks(values: Tensor, block: int = BLOCK) -> Tensor:
    """``values`` in row-major order as rows of ``block``, the last one padded with zeros."""
    flat = values.reshape(-1).float()
    padding = -flat.numel() % block
    if padding:
        flat = torch.nn.functional.pad(flat, (0, padding))
    return flat.view(-1, block)


def _nearest_codes(scaled: Tensor, state_format: str, signed: bool) -> Tensor:
    """Each value of ``scaled`` (within the map's range) as the index of its nearest code."""
    low = -1.0 if signed else 0.0
    return torch.bucketize(scaled.clamp(low, 1.0), _map_and_bounds(state_format, signed, scaled.device)[1])


def quantize_8bit(values: Tensor, signed: bool, absmax: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(codes, absmax)``: each value's nearest code of the dynamic map after its block is divided
    by its largest magnitude (or by the given ``absmax``, one per block); ``codes`` is ``uint8`` shaped
    like ``values``, ``absmax`` float32 per block. A block of zeros keeps the scale 0 (its codes decode
    to 0)."""
    blocks = _blocks(values)
    if absmax is None:
        absmax = blocks.abs().amax(dim=1)
    scaled = (blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)).view(-1)[: values.numel()]
    codes = _nearest_codes(scaled, "8bit", signed).to(torch.uint8)  # a tensor of its own: no padding kept
    return codes.view(values.shape), absmax


def dequantize_8bit(codes: Tensor, absmax: Tensor, signed: bool, dtype: torch.dtype) -> Tensor:
    """The values that ``quantize_8bit`` encoded as ``(codes, absmax)``, in ``dtype``."""
    # index_select with int32 indices: 2.4x faster than indexing with an int64 copy (1M codes, 1 thread)
    values = _map_and_bounds("8bit", signed, codes.device)[0].index_select(0, codes.reshape(-1).int())
    padding = -values.numel() % BLOCK
    if padding:
        values = torch.nn.functional.pad(values, (0, padding))
    values = (values.view(-1, BLOCK) * absmax.unsqueeze(1)).view(-1)[: codes.numel()]
    return values.view(codes.shape).to(dtype)


def rank1_normalised(shape: tuple[int, ...]) -> bool:
    """Whether the 4-bit format scales an unsigned moment of ``shape`` by rank-1 normalisation (two
    or more dimensions, none empty) rather than per block."""
    return len(shape) >= 2 and math.prod(shape) > 0


def _rank1_maxima(values: Tensor) -> Tensor:
    r"""For each dimension :math:`d` of ``values``, the largest value along all the others
    (:math:`M_d`, :math:`n_d` floats), concatenated one dimension after another."""
    dims = range(values.dim())
    return torch.cat([values.amax(dim=[other for other in dims if other != dim]) for dim in dims])


def _rank1_scale(maxima: Tensor, shape: tuple[int, ...]) -> Tensor:
    r"""Each entry's scale :math:`\min_d M_d[i_d]`, from the concatenated maxima of :func:`_rank1_maxima`."""
    scale, start = None, 0
    for dim, size in enumerate(shape):
        view = [1] * len(shape)
        view[dim] = size
        along = maxima[start:start + size].view(view)
        scale = along if scale is None else torch.minimum(scale, along)
        start += size
    assert scale is not None, "rank-1 normalisation is for tensors of two or more dimensions"
    return scale.expand(shape)


def quantize_4bit(values: Tensor, signed: bool, scales: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(codes, scales)``: each value's nearest 4-bit code after division by its scale, two codes
    per byte (``uint8``, ``ceil(n / 2)``), and the scales (float32): per block of :data:`BLOCK_4BIT`
    (the largest magnitude, or as given), or for an unsigned moment of two or more dimensions the
    rank-1 maxima. A zero scale decodes to 0."""
    tiny = torch.finfo(torch.float32).tiny
    if not signed and rank1_normalised(tuple(values.shape)):
        scales = _rank1_maxima(values.float())
        scaled = (values.float() / _rank1_scale(scales, tuple(values.shape)).clamp(min=tiny)).reshape(-1)
    else:
        blocks = _blocks(values, BLOCK_4BIT)
        if scales is None:
            scales = blocks.abs().amax(dim=1)
        scaled = (blocks / scales.clamp(min=tiny).unsqueeze(1)).view(-1)[: values.numel()]
    codes = _nearest_codes(scaled, "4bit", signed).to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4), scales


def dequantize_4bit(codes: Tensor, scales: Tensor, signed: bool, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """The values of ``shape`` that ``quantize_4bit`` encoded as ``(codes, scales)``, in ``dtype``."""
    count = math.prod(shape)
    indices = torch.stack([codes & 15, codes >> 4], dim=1).reshape(-1)[:count].int()
    values = _map_and_bounds("4bit", signed, codes.device)[0].index_select(0, indices)
    if not signed and rank1_normalised(shape):
        return (values.view(shape) * _rank1_scale(scales, shape)).to(dtype)
    padding = -count % BLOCK_4BIT
    if padding:
        values = torch.nn.functional.pad(values, (0, padding))
    return (values.view(-1, BLOCK_4BIT) * scales.unsqueeze(1)).view(-1)[:count].view(shape).to(dtype)


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
    """``state_format`` if ``optimizer_class`` offers it (its ``_state_formats``); a ``ValueError``
    otherwise."""
    check_choice("state_format", state_format, STATE_FORMATS)
    offered = getattr(optimizer_class, "_state_formats", ("fp32",))
    if state_format not in offered:
        name = optimizer_class.__name__
        if len(offered) == 1:
            raise ValueError(f"state_format: {name} keeps its state as torch does, only 'fp32'; got {state_format!r}")
        raise ValueError(f"state_format: {name} offers {', '.join(map(repr, offered))}; got {state_format!r}")
    return state_format


def is_stored(key: str) -> bool:
    """Whether ``key`` names a formatted moment's block scales (stored beside the moment)."""
    return key.endswith(ABSMAX_SUFFIX)


class FormattedState(MutableMapping):
    """One parameter's state during a step under ``state_format``: moments named in ``signs``
    (key: whether its values are signed) read as working tensors of ``dtype``, decoded on first
    access, and written back in the format by :meth:`commit`; other keys pass through to the
    stored state. ``shape`` is the parameter's, which the moments share."""

    def __init__(self, stored: MutableMapping, state_format: str, signs: dict[str, bool], dtype: torch.dtype,
                 shape: tuple[int, ...]) -> None:
        self.stored = stored
        self.state_format = state_format
        self.signs = signs
        self.dtype = dtype
        self.shape = shape
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
        """The stored moment ``key`` as a working tensor: codes and scales dequantised (8-bit codes
        have the parameter's shape, 4-bit ones are packed flat: for a parameter of shape ``(1,)``,
        where both are, the format says which), a bf16 or full-precision tensor (written under
        another format) converted."""
        value = self.stored[key]
        scales = self.stored.get(key + ABSMAX_SUFFIX)
        if scales is not None and value.dtype == torch.uint8:
            if tuple(value.shape) == self.shape and not (self.shape == (1,) and self.state_format == "4bit"):
                return dequantize_8bit(value, scales, self.signs[key], self.dtype)
            return dequantize_4bit(value, scales, self.signs[key], self.shape, self.dtype)
        return value.to(self.dtype, copy=True)

    def commit(self) -> None:
        """Write every working moment back in the format (the codes and scales into their existing
        storage when they have one); ``"bf16-sr"`` rounds each write with fresh draws."""
        for key, value in self.working.items():
            if self.state_format == "bf16-sr":
                draws = self.stored.get(DRAWS_KEY, 0)
                self.stored[DRAWS_KEY] = draws + 1
                value = stochastic_round_bf16(value, draw_seed(draws, key, value.numel()))
            self.encode(key, value)
        self.working.clear()

    def encode(self, key: str, value: Tensor, block_scales: Tensor | None = None) -> None:
        """Store ``value`` as moment ``key`` in the format: quantised with fresh scales (or the given
        ones, per block), or rounded to the nearest bf16 (exact for a value read back from a bf16
        format, which is how a loaded checkpoint's moments come back: :meth:`commit` rounds
        stochastically before this)."""
        if self.state_format in ("8bit", "4bit"):
            quantize = quantize_8bit if self.state_format == "8bit" else quantize_4bit
            codes, scales = quantize(value, self.signs[key], block_scales)
            self._store(key, codes)
            self._store(key + ABSMAX_SUFFIX, scales)
            return
        self.stored.pop(key + ABSMAX_SUFFIX, None)
        self._store(key, value.to(torch.bfloat16))

    def _store(self, key: str, value: Tensor) -> None:
        old = self.stored.get(key)
        if isinstance(old, Tensor) and old.dtype == value.dtype and old.shape == value.shape:
            old.copy_(value)
        else:
            self.stored[key] = value


def buffer_bytes(state_format: str, shape: tuple[int, ...], signed: bool, element_size: int) -> int:
    """Bytes of one moment buffer of ``shape`` stored in ``state_format`` (``element_size``: the
    parameter's bytes per value, which ``"fp32"`` keeps): 8-bit, a byte per value and 4 per block
    of 256 (8-bit AdamW: 2 bytes per parameter and 8 per block); 4-bit, half a byte per value
    (rounded up) and 4 per block of 128 or, for a rank-1 normalised second moment, 4 per row, per
    column, ... (4-bit AdamW on a 4096 x 4096 matrix: 1.0 byte per parameter and 0.002 of scales)."""
    count = math.prod(shape)
    if state_format == "fp32":
        return count * element_size
    if state_format in ("bf16", "bf16-sr"):
        return 2 * count
    if state_format == "8bit":
        return count + 4 * -(-count // BLOCK)
    scales = sum(shape) if not signed and rank1_normalised(shape) else -(-count // BLOCK_4BIT)
    return -(-count // 2) + 4 * scales
