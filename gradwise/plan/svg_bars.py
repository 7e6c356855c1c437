"""A stacked-bar chart written directly as SVG text, without matplotlib.

``gradwise plan memory`` draws one such chart and must start within 1.3x the time of
``import torch`` (issue 13): importing matplotlib alone costs a third of that. A stacked bar
chart is a few rectangles, lines and labels, so it is written here by hand: the figure that
``matplotlib`` drew before (bars stacked by series, the total above each bar, a title, a
y-axis label with ticks at round values, a legend and a light horizontal grid), in
matplotlib's default colours. Every piece of text is escaped, so any title is safe.
Each bar segment carries a ``<title>`` (its series, category and value), which a browser
shows on hover and which a reader of the file can check.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
           "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
"""matplotlib's default colour cycle (``tab10``), so the chart looks like the project's other plots."""

WIDTH, HEIGHT = 800, 450
LEFT, RIGHT, TOP, BOTTOM = 70.0, 600.0, 50.0, 400.0
"""The plot area in the 800 x 450 canvas; the legend sits to its right, so it never hides a bar."""

LARGEST_RANGE = (1e-300, 1e300)
"""The tallest bar's total must lie here: the axis' round top and its tick step are then
ordinary floats (a subnormal total would have no tick step, one near 1e308 no headroom)."""

BAR_FILL = 0.8
"""The share of each category's slot a bar covers (matplotlib's default bar width)."""


def nice_step(span: float, ticks: int = 8) -> float:
    """The smallest tick step 1, 2 or 5 x 10^k at or above ``span / ticks``: round numbers on the
    axis, at most ``ticks`` intervals."""
    if not math.isfinite(span) or span <= 0:
        raise ValueError(f"span must be a finite number > 0, got {span!r}")
    raw = span / ticks
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw * (1 - 1e-12))


def _number(value: float) -> str:
    """A coordinate, to a hundredth of a pixel."""
    return f"{value:.2f}".rstrip("0").rstrip(".")


def _text(x: float, y: float, content: str, **attributes: str) -> str:
    """A ``<text>`` element; ``text_anchor`` becomes ``text-anchor``, ``class_`` ``class``."""
    extra = "".join(f" {name.rstrip('_').replace('_', '-')}={quoteattr(value)}" for name, value in attributes.items())
    return f'<text x="{_number(x)}" y="{_number(y)}"{extra}>{escape(content)}</text>'


def stacked_bars_svg(categories: Sequence[str], series: Mapping[str, Sequence[float]], title: str, y_label: str,
                     total_format: str = "{:.3g}") -> str:
    """The SVG text of bars stacked by ``series`` (name -> one value per category).

    Heights are proportional to the values on an axis from 0 to a round value above the
    largest total (plus room for its label). A series whose values are all zero draws nothing,
    so it is left out of the legend too. ``total_format`` formats the total above each bar.
    """
    if not categories:
        raise ValueError("categories: need at least one bar, got none")
    for name, values in series.items():
        if len(values) != len(categories):
            raise ValueError(f"series {name!r}: {len(values)} values for {len(categories)} categories")
        for value in values:
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"series {name!r}: values must be finite and >= 0, got {value!r}")
    drawn = {name: values for name, values in series.items() if any(values)}
    totals = [sum(values[i] for values in drawn.values()) for i in range(len(categories))]
    if max(totals) and not LARGEST_RANGE[0] <= max(totals) <= LARGEST_RANGE[1]:
        raise ValueError(f"series: the tallest bar, {max(totals)!r}, is outside the drawable range "
                         f"[{LARGEST_RANGE[0]:g}, {LARGEST_RANGE[1]:g}] (or all zero); rescale the values")
    step = nice_step(max(totals) * 1.08) if max(totals) > 0 else 1.0  # 8%: room for the total's label
    top = step * math.ceil(max(totals) * 1.08 / step) if max(totals) > 0 else 1.0
    scale = (BOTTOM - TOP) / top
    slot = (RIGHT - LEFT) / len(categories)
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="DejaVu Sans, Arial, sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           _text((LEFT + RIGHT) / 2, TOP - 20, title, text_anchor="middle", font_size="14", class_="title")]
    for i in range(round(top / step) + 1):
        y = BOTTOM - i * step * scale
        out.append(f'<line class="grid" x1="{_number(LEFT)}" x2="{_number(RIGHT)}" y1="{_number(y)}" '
                   f'y2="{_number(y)}" stroke="#b0b0b0" stroke-opacity="0.3"/>')
        out.append(_text(LEFT - 6, y + 4, f"{i * step:.12g}", text_anchor="end", class_="tick"))
    out.append(_text(18, (TOP + BOTTOM) / 2, y_label, text_anchor="middle", class_="ylabel",
                     transform=f"rotate(-90 18 {_number((TOP + BOTTOM) / 2)})"))
    for i, category in enumerate(categories):
        x = LEFT + slot * (i + (1 - BAR_FILL) / 2)
        base = BOTTOM
        for colour, (name, values) in zip(itertools.cycle(COLOURS), drawn.items()):
            height = values[i] * scale
            if values[i]:
                out.append(f'<rect class="segment" x="{_number(x)}" y="{_number(base - height)}" '
                           f'width="{_number(slot * BAR_FILL)}" height="{_number(height)}" fill="{colour}">'
                           f'<title>{escape(f"{name}, {category}: {values[i]:.6g}")}</title></rect>')
            base -= height
        centre = LEFT + slot * (i + 0.5)
        out.append(_text(centre, base - 4, total_format.format(totals[i]), text_anchor="middle", class_="total"))
        out.append(_text(centre, BOTTOM + 18, category, text_anchor="middle", class_="category"))
    out.append(f'<rect x="{_number(LEFT)}" y="{_number(TOP)}" width="{_number(RIGHT - LEFT)}" '
               f'height="{_number(BOTTOM - TOP)}" fill="none" stroke="black" stroke-width="0.8"/>')
    for row, (colour, name) in enumerate(zip(itertools.cycle(COLOURS), drawn)):
        y = TOP + 10 + 20 * row
        out.append(f'<rect class="key" x="{_number(RIGHT + 15)}" y="{_number(y)}" width="14" height="10" '
                   f'fill="{colour}"/>')
        out.append(_text(RIGHT + 35, y + 9, name, class_="legend"))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_stacked_bars(path: Path, categories: Sequence[str], series: Mapping[str, Sequence[float]], title: str,
                       y_label: str, total_format: str = "{:.3g}") -> Path:
    """Write :func:`stacked_bars_svg`'s chart to ``path`` (UTF-8) and return ``path``."""
    path.write_text(stacked_bars_svg(categories, series, title, y_label, total_format), encoding="utf-8")
    return path
