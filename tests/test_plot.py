"""deepseek_tf.plot: SVG line charts (loss.svg, tools/compare_runs) without matplotlib."""

from xml.etree import ElementTree

import pytest

from deepseek_tf.plot import Series, line_chart, ticks

NS = "{http://www.w3.org/2000/svg}"


def _xy(points: str) -> list[tuple[float, float]]:
    return [tuple(map(float, p.split(","))) for p in points.split()]


def test_ticks_are_round_and_cover_the_range():
    assert ticks(0.0, 1.0) == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    t = ticks(1.37, 2.91)
    assert t[0] <= 1.37 and t[-1] >= 2.91 and len(t) <= 9
    assert ticks(5.0, 5.0)[0] <= 5.0 <= ticks(5.0, 5.0)[-1]  # a flat series still has axes


def test_points_map_to_the_plot_area_in_order_and_skip_non_finite_values():
    svg = ElementTree.fromstring(line_chart(
        [Series("train", [(1, 3.0), (2, float("nan")), (3, 2.0), (4, 1.0)]),
         Series("eval", [(4, 1.5)], lines=False, dots=True)], "step", "loss"))
    (line,) = svg.findall(f"{NS}polyline")
    xy = _xy(line.get("points"))
    assert len(xy) == 3  # the NaN point is left out
    assert xy[0][0] < xy[1][0] < xy[2][0]  # steps go right
    assert xy[0][1] < xy[1][1] < xy[2][1]  # a falling loss goes down the screen (y grows)
    (dot,) = svg.findall(f"{NS}circle")
    assert xy[1][1] < float(dot.get("cy")) < xy[2][1]  # eval 1.5 between 2.0 and 1.0
    texts = [t.text for t in svg.iter(f"{NS}text")]
    assert {"step", "loss", "train", "eval"} <= set(texts)


def test_labels_are_escaped_and_nothing_to_plot_is_refused():
    svg = line_chart([Series("a<b & c", [(0, 1.0), (1, 2.0)])], "x", "y")
    assert "a&lt;b &amp; c" in svg
    ElementTree.fromstring(svg)  # still well-formed
    with pytest.raises(ValueError, match="no finite points"):
        line_chart([Series("x", [(0, float("inf"))])], "x", "y")
