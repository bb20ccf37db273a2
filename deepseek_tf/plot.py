"""Line charts as SVG files, with no plotting library: the loss curves of a run
(`loss.svg`) and of several runs (`tools/compare_runs`).

SVG rather than PNG through matplotlib: a browser, an editor or GitHub shows it, and
keeping matplotlib out of the dependencies matters beyond plotting, since Keras imports
matplotlib (and scikit-learn) at start-up whenever they are installed, which cost every
TensorFlow process here about 3 s of CPU.

Example:
    >>> svg = line_chart([Series("train", [(1, 2.5), (2, 2.1)])], "step", "loss")
    >>> svg.startswith("<svg")
    True
"""

from __future__ import annotations

import dataclasses
import math
from xml.sax.saxutils import escape

#: matplotlib's default colour cycle ("C0".."C9"), so series keep familiar colours.
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
          "#7f7f7f", "#bcbd22", "#17becf")
WIDTH, HEIGHT = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 20, 50  # margins around the plot area (pixels)


@dataclasses.dataclass(frozen=True)
class Series:
    """One curve. Args: label (legend text); points [(x, y)], non-finite ys skipped;
    lines (join the points); dots (mark each point); color (None: by position)."""
    label: str
    points: list
    lines: bool = True
    dots: bool = False
    color: str | None = None


def ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 x 10^k apart) covering [lo, hi]."""
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _label(v: float) -> str:
    return f"{v:.6g}" if abs(v) < 1e5 else f"{v:.2e}"


def line_chart(series: list[Series], xlabel: str, ylabel: str) -> str:
    """The SVG text of `series` on shared axes, with grid, tick labels and a legend."""
    pts = [(x, y) for s in series for x, y in s.points if math.isfinite(y)]
    if not pts:
        raise ValueError("nothing to plot: no finite points")
    xt = ticks(min(p[0] for p in pts), max(p[0] for p in pts))
    yt = ticks(min(p[1] for p in pts), max(p[1] for p in pts))
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def sx(x):
        return LEFT + (x - xt[0]) / (xt[-1] - xt[0]) * w

    def sy(y):
        return TOP + h - (y - yt[0]) / (yt[-1] - yt[0]) * h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>']
    for x in xt:
        out.append(f'<line x1="{sx(x):.1f}" y1="{TOP}" x2="{sx(x):.1f}" y2="{TOP + h}" '
                   f'stroke="#ddd"/><text x="{sx(x):.1f}" y="{TOP + h + 16}" '
                   f'text-anchor="middle">{_label(x)}</text>')
    for y in yt:
        out.append(f'<line x1="{LEFT}" y1="{sy(y):.1f}" x2="{LEFT + w}" y2="{sy(y):.1f}" '
                   f'stroke="#ddd"/><text x="{LEFT - 6}" y="{sy(y) + 4:.1f}" '
                   f'text-anchor="end">{_label(y)}</text>')
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{w}" height="{h}" fill="none" '
               f'stroke="black"/>')
    out.append(f'<text x="{LEFT + w / 2}" y="{HEIGHT - 10}" text-anchor="middle">'
               f'{escape(xlabel)}</text>')
    out.append(f'<text transform="translate(16,{TOP + h / 2}) rotate(-90)" '
               f'text-anchor="middle">{escape(ylabel)}</text>')
    lx = LEFT + w - 40 - 7 * max(len(s.label) for s in series)  # the legend, top right
    for i, s in enumerate(series):
        color = s.color or COLORS[i % len(COLORS)]
        xy = [(sx(x), sy(y)) for x, y in s.points if math.isfinite(y)]
        if s.lines and len(xy) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" '
                       f'stroke-width="1.5"/>')
        if s.dots or len(xy) == 1:
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in xy]
        ly = TOP + 16 + 16 * i
        out.append(f'<line x1="{lx}" y1="{ly - 4}" x2="{lx + 20}" y2="{ly - 4}" '
                   f'stroke="{color}" stroke-width="2"/><text x="{lx + 25}" y="{ly}">'
                   f'{escape(s.label)}</text>')
    out.append("</svg>\n")
    return "\n".join(out)
