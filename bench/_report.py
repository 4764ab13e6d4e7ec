"""What every benchmark gives besides its printed tables: progress while it runs, and its
main figures saved as a markdown table and a PNG plot side by side.

    from _report import Chart, Transcript, progress, save

    with Transcript() as printed:          # stdout, also kept: the markdown to save
        for n in progress(range(200), desc="responses"):
            ...
        print(table)
    save("cancel", printed.text, Chart("cancel → reply", "ms", ["p50", "p99"], {"tether": [3, 9]}))

Files go to `bench/out/NAME.md` and `bench/out/NAME.png` (`TETHER_BENCH_OUT` moves them).
Progress bars write to stderr, so stdout stays the tables alone.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, TextIO, TypeVar

try:
    from tqdm import tqdm
except ImportError:  # tqdm is in the `test` extra; without it, a plain line now and then
    tqdm = None

T = TypeVar("T")
# Bars this many or fewer get their value written on them (more would be unreadable).
LABELLED_BARS = 16


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
) -> Any:
    """A progress bar on stderr (use as an iterable wrapper, or `.update(n)` by hand)."""
    if tqdm is None:
        return _Plain(iterable, total=total, desc=desc, unit=unit)
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        mininterval=0.5,
        dynamic_ncols=True,
        leave=False,
    )


class _Plain:
    """What `progress` gives without tqdm: the same calls, a line on stderr every 5 s."""

    def __init__(
        self, iterable: Iterable[Any] | None, *, total: float | None, desc: str, unit: str
    ) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = 0.0
        self._shown = time.monotonic()

    def __iter__(self) -> Iterator[Any]:
        assert self.iterable is not None
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: float = 1) -> None:
        self.n += n
        if time.monotonic() - self._shown >= 5:
            self._shown = time.monotonic()
            of = f"/{self.total:g}" if self.total else ""
            print(f"{self.desc}: {self.n:g}{of} {self.unit}", file=sys.stderr, flush=True)

    def set_postfix_str(self, s: str) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Plain:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class Transcript:
    """While active, what is printed to stdout still goes there and is also kept in `text`:
    the markdown `save` writes is then exactly the tables the benchmark printed."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._stdout: TextIO | None = None

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def write(self, s: str) -> int:
        assert self._stdout is not None
        self._parts.append(s)
        return self._stdout.write(s)

    def flush(self) -> None:
        if self._stdout is not None:
            self._stdout.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding...: the real stdout
        return getattr(self._stdout or sys.__stdout__, name)

    def __enter__(self) -> Transcript:
        self._stdout = sys.stdout
        sys.stdout = self  # type: ignore[assignment]
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        sys.stdout = self._stdout  # type: ignore[assignment]
        self._stdout = None


@dataclass
class Chart:
    """One plot: a value per category for each series, as grouped bars or lines.

    Lines over numeric categories (times, sizes) are drawn at their values, not evenly;
    `horizontal` bars suit many or long category names (operations, routes)."""

    title: str
    ylabel: str
    categories: Sequence[Any]
    series: dict[str, Sequence[float]]
    kind: Literal["bar", "line"] = "bar"
    xlabel: str = ""
    log: bool = False
    # Horizontal reference lines (a goal, a baseline): label -> y.
    marks: dict[str, float] = field(default_factory=dict)
    horizontal: bool = False


def out_dir() -> Path:
    path = Path(os.environ.get("TETHER_BENCH_OUT", Path(__file__).parent / "out"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def save(name: str, markdown: str, *charts: Chart) -> tuple[Path, Path]:
    """Write `NAME.md` (the tables) and `NAME.png` (one panel per chart); print both paths."""
    directory = out_dir()
    md, png = directory / f"{name}.md", directory / f"{name}.png"
    md.write_text(markdown.rstrip() + "\n")
    plot(png, charts)
    print(f"\nwrote {md} and {png}")
    return md, png


def plot(path: Path, charts: Sequence[Chart]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = max(1, len(charts))
    # Up to three panels side by side; more wrap onto rows of two.
    cols = panels if panels <= 3 else 2
    rows = math.ceil(panels / cols)
    # Each column as wide as its widest panel needs, each row as tall as its tallest.
    widths = [max((_width(c) for c in charts[i::cols]), default=5.5) for i in range(cols)]
    heights = [
        max((_height(c) for c in charts[r * cols : (r + 1) * cols]), default=4.2)
        for r in range(rows)
    ]
    fig, axes = plt.subplots(
        rows,
        cols,
        figsize=(sum(widths), sum(heights)),
        squeeze=False,
        gridspec_kw={"width_ratios": widths, "height_ratios": heights},
    )
    flat = list(axes.flat)
    for ax, chart in zip(flat, charts, strict=False):
        _draw(ax, chart)
    for ax in flat[len(charts) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _width(chart: Chart) -> float:
    """Inches for one panel: room for the bars and their names."""
    if chart.horizontal:
        return 9.0
    if chart.kind == "bar":
        bars = 0.25 * len(chart.categories) * max(1, len(chart.series))
        return min(12.0, max(5.5, bars, _text_width(chart.categories) + 1.5))
    return 5.5


def _text_width(categories: Sequence[Any]) -> float:
    """Inches the x tick labels take side by side (their longest lines, at 8 pt)."""
    return 0.075 * sum(max(len(line) for line in str(c).split("\n")) + 2 for c in categories)


def _height(chart: Chart) -> float:
    if chart.horizontal:
        return max(4.2, 0.12 * len(chart.categories) * (1 + len(chart.series)) + 1.5)
    return 4.2


def _numeric(values: Sequence[Any]) -> bool:
    return bool(values) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    )


def _draw(ax: Any, chart: Chart) -> None:
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    at_values = chart.kind == "line" and _numeric(chart.categories)
    xs = [float(c) for c in chart.categories] if at_values else list(range(len(chart.categories)))
    if chart.kind == "bar":
        _bars(ax, chart, xs)
    else:
        marker = "o" if len(xs) <= 30 else None
        for name, values in chart.series.items():
            ax.plot(xs, list(values), marker=marker, label=name)
    _marks(ax, chart)
    _from_zero(ax, chart)
    # Horizontal bars swap the axes: categories down the y axis, values along x.
    value_axis, category_axis = ("x", "y") if chart.horizontal else ("y", "x")
    labels = [str(c) for c in chart.categories]
    if chart.horizontal:
        ax.set_yticks(xs, labels, fontsize=8)
        ax.invert_yaxis()  # the first category on top, as a table reads
    elif not at_values:
        ax.set_xticks(xs, labels, fontsize=8)
    elif all(isinstance(c, int) for c in chart.categories):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds, jobs: no 1.25
        # Labels wider than the panel are tilted so that they do not run into each other.
        if _text_width(labels) > 0.8 * _width(chart):
            ax.tick_params(axis="x", labelrotation=25)
            for tick in ax.get_xticklabels():
                tick.set_horizontalalignment("right")
    ax.set(title=chart.title)
    ax.set(**{f"{value_axis}label": chart.ylabel, f"{category_axis}label": chart.xlabel})
    ax.title.set_fontsize(10)
    ax.grid(axis=value_axis, alpha=0.3)
    if chart.log:
        ax.set(**{f"{value_axis}scale": "log"})
    else:
        getattr(ax, f"{value_axis}axis").set_major_formatter(FuncFormatter(_label))
    if len(chart.series) > 1:
        ax.legend(fontsize=8)


def _bars(ax: Any, chart: Chart, xs: list[float]) -> None:
    """Grouped bars, a series beside the other in each category; values written on them."""
    names = list(chart.series)
    width = 0.8 / max(1, len(names))
    draw = ax.barh if chart.horizontal else ax.bar
    for i, name in enumerate(names):
        offset = (i - (len(names) - 1) / 2) * width
        bars = draw([x + offset for x in xs], list(chart.series[name]), width, label=name)
        if len(xs) * len(names) <= LABELLED_BARS or chart.horizontal:
            ax.bar_label(bars, fmt=_label, fontsize=7, padding=1)


def _from_zero(ax: Any, chart: Chart) -> None:
    """Counts, sizes and times start at 0 (a flat line is then seen as flat), and all
    zeros (no problem found) show as such, not around a centred 0."""
    values = [v for vs in chart.series.values() for v in vs if not math.isnan(v)]
    values += list(chart.marks.values())
    if chart.log or not values or min(values) < 0:
        return
    top = 1.08 * max(values) if max(values) > 0 else 1  # room for the values on bars
    (ax.set_xlim if chart.horizontal else ax.set_ylim)(0, top)


def _marks(ax: Any, chart: Chart) -> None:
    """Reference lines across the values' axis, each labelled at its start."""
    for label, value in chart.marks.items():
        if chart.horizontal:
            ax.axvline(value, linestyle="--", color="gray", linewidth=1)
            at, coords, shift = (value, 1), ("data", "axes fraction"), (3, -10)
        else:
            ax.axhline(value, linestyle="--", color="gray", linewidth=1)
            at, coords, shift = (0, value), ("axes fraction", "data"), (2, 3)
        ax.annotate(
            label, at, xycoords=coords, textcoords="offset points", xytext=shift, fontsize=8
        )


def _label(value: float, _position: object = None) -> str:
    """A value, short: 3 significant digits, k / M for thousands and millions (not 8.5e+04)."""
    if math.isnan(value):
        return ""
    size = abs(value)
    if size >= 1e6:
        return f"{value / 1e6:.3g}M"
    if size >= 1e4:
        return f"{value / 1e3:.3g}k"
    if size >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"
