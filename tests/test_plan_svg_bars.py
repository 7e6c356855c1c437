"""The memory plan's SVG bar chart (issue 13: written without matplotlib), read back with xml.etree."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradwise.cli import main
from gradwise.plan.svg_bars import COLOURS, nice_step, stacked_bars_svg

SVG = "{http://www.w3.org/2000/svg}"


def parse(text: str) -> ET.Element:
    return ET.fromstring(text.encode("utf-8"))


def of_class(root: ET.Element, tag: str, name: str) -> list[ET.Element]:
    return [e for e in root.iter(SVG + tag) if e.get("class") == name]


def segments(root: ET.Element) -> list[dict]:
    """Each bar segment: its box and its tooltip's ``series, category: value``."""
    found = []
    for rect in of_class(root, "rect", "segment"):
        series, category, value = re.fullmatch(r"(.*), (.*): (.*)", rect.find(SVG + "title").text).groups()
        found.append({"series": series, "category": category, "value": float(value), "fill": rect.get("fill"),
                      **{k: float(rect.get(k)) for k in ("x", "y", "width", "height")}})
    return found


def axis_scale(root: ET.Element) -> float:
    """Pixels per unit, read from the tick labels and their grid lines (as a reader of the chart would)."""
    ticks = [(float(t.text), float(t.get("y")) - 4) for t in of_class(root, "text", "tick")]
    (v0, y0), (v1, y1) = ticks[0], ticks[-1]
    return (y0 - y1) / (v1 - v0)


def test_memory_plot_bars_are_proportional_to_the_bytes(tmp_path, capsys):
    assert main(["plan", "memory", "--layers", "12", "--width", "768", "--seq-len", "1024", "--micro-batch", "8",
                 "--precision", "mixed", "--devices", "8", "--out", str(tmp_path), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["plot"] == str(tmp_path / "memory.svg")
    root = parse((tmp_path / "memory.svg").read_text(encoding="utf-8"))
    scale = axis_scale(root)
    boxes = segments(root)
    kinds = ["parameters", "gradients", "master_weights", "optimizer_state", "activations"]
    by_stage = {row["label"]: row["bytes"] for row in payload["by_stage"]}
    assert [box["category"] for box in boxes] == [label for label in by_stage for kind in kinds
                                                  if by_stage[label][kind] > 0]
    for box in boxes:
        expected = by_stage[box["category"]][box["series"].replace(" ", "_")]
        assert box["height"] == pytest.approx(expected / 1e9 * scale, abs=0.011)
        assert box["value"] == pytest.approx(expected / 1e9, rel=1e-5)
    # Stacked: each segment starts where the one below it ends; bars stand on the axis (y = 400).
    totals = of_class(root, "text", "total")
    for label, total in zip(by_stage, totals):
        bar = [box for box in boxes if box["category"] == label]
        assert bar[0]["y"] + bar[0]["height"] == pytest.approx(400, abs=0.011)
        for lower, upper in zip(bar, bar[1:]):
            assert upper["y"] + upper["height"] == pytest.approx(lower["y"], abs=0.011)
        assert 400 - bar[-1]["y"] == pytest.approx(by_stage[label]["total"] / 1e9 * scale, abs=0.03)
        assert total.text == f"{by_stage[label]['total'] / 1e9:.3g} GB"
        assert float(total.get("y")) == pytest.approx(bar[-1]["y"] - 4, abs=0.011)
    assert [t.text for t in of_class(root, "text", "category")] == ["DP", "ZeRO-1", "ZeRO-2", "ZeRO-3"]
    assert of_class(root, "text", "title")[0].text == "0.124B params, adamw, mixed, 8 devices"
    assert of_class(root, "text", "ylabel")[0].text == "GB per device"
    assert [t.text for t in of_class(root, "text", "legend")] == [k.replace("_", " ") for k in kinds]
    assert [k.get("fill") for k in of_class(root, "rect", "key")] == list(COLOURS[:5])


def test_zero_size_kinds_are_left_out_of_bars_and_legend(tmp_path, capsys):
    # bf16 keeps no master copy and no activations are asked for: two kinds are zero everywhere.
    assert main(["plan", "memory", "--params", "1e9", "--out", str(tmp_path)]) == 0
    assert f"wrote {tmp_path / 'memory.svg'}" in capsys.readouterr().out
    root = parse((tmp_path / "memory.svg").read_text(encoding="utf-8"))
    assert [t.text for t in of_class(root, "text", "legend")] == ["parameters", "gradients", "optimizer state"]
    assert {box["series"] for box in segments(root)} == {"parameters", "gradients", "optimizer state"}
    assert [t.text for t in of_class(root, "text", "total")] == ["12 GB"] * 4


def test_hostile_text_is_escaped():
    title, category, series = 'a <b> & "c" </svg><script>', "<DP & co>", 'x"y<z>'
    text = stacked_bars_svg([category], {series: [1.0]}, title, "<GB>")
    assert "<script>" not in text and "&lt;script&gt;" in text
    root = parse(text)
    assert of_class(root, "text", "title")[0].text == title
    assert of_class(root, "text", "category")[0].text == category
    assert of_class(root, "text", "legend")[0].text == series
    assert of_class(root, "text", "ylabel")[0].text == "<GB>"
    assert segments(root)[0]["series"] == series


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e6)), min_size=3, max_size=3), min_size=1,
                max_size=6))
def test_any_values_give_proportional_stacks_under_the_top_tick(columns):
    series = {f"s{i}": [column[i] for column in columns] for i in range(3)}
    root = parse(stacked_bars_svg([f"c{j}" for j in range(len(columns))], series, "t", "y"))
    scale = axis_scale(root)
    top_tick = max(float(t.text) for t in of_class(root, "text", "tick"))
    assert top_tick >= max(sum(column) for column in columns)
    for box in segments(root):
        assert box["height"] == pytest.approx(box["value"] * scale, rel=1e-4, abs=0.011)
        assert box["y"] >= 50 - 0.011  # inside the plot area
    drawn = [name for name, values in series.items() if any(values)]
    assert [t.text for t in of_class(root, "text", "legend")] == drawn


@pytest.mark.parametrize("span, step", [(12.96, 2.0), (1.0, 0.2), (8.0, 1.0), (8.01, 2.0), (0.0037, 0.0005),
                                        (7.5e9, 1e9), (100.0, 20.0)])
def test_ticks_are_one_two_or_five_times_a_power_of_ten(span, step):
    assert nice_step(span) == pytest.approx(step)
    mantissa = step / 10 ** math.floor(math.log10(step) + 1e-9)
    assert round(mantissa, 9) in (1, 2, 5)


@pytest.mark.parametrize("call, message", [
    (lambda: stacked_bars_svg([], {}, "t", "y"), "categories: need at least one bar"),
    (lambda: stacked_bars_svg(["a"], {"s": [1.0, 2.0]}, "t", "y"), "series 's': 2 values for 1 categories"),
    (lambda: stacked_bars_svg(["a"], {"s": [-1.0]}, "t", "y"), "finite and >= 0, got -1.0"),
    (lambda: stacked_bars_svg(["a"], {"s": [math.nan]}, "t", "y"), "finite and >= 0, got nan"),
    (lambda: stacked_bars_svg(["a"], {"s": [5e-324]}, "t", "y"), "the tallest bar, 5e-324, is outside"),
    (lambda: stacked_bars_svg(["a", "b"], {"s": [1e300, 0.0], "r": [1e300, 1.0]}, "t", "y"),
     "the tallest bar, 2e+300, is outside the drawable range [1e-300, 1e+300]"),
    (lambda: nice_step(0.0), "span must be a finite number > 0, got 0.0"),
    (lambda: nice_step(math.inf), "span must be a finite number > 0, got inf"),
])
def test_bad_input_is_refused_by_name(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_all_zero_values_draw_an_empty_chart():
    root = parse(stacked_bars_svg(["a", "b"], {"s": [0.0, 0.0]}, "t", "y"))
    assert segments(root) == [] and of_class(root, "text", "legend") == []
    assert [t.text for t in of_class(root, "text", "total")] == ["0", "0"]
