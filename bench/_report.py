"""What every benchmark gives besides its printed tables: progress while it runs, and its
main figures saved as a markdown table and a PNG plot side by side.

    from _report import Chart, progress, save

    for n in progress(range(200), desc="responses"):
        ...
    save("cancel", markdown, Chart("cancel → reply", "ms", ["p50", "p99"], {"tether": [3, 9]}))

Files go to `bench/out/NAME.md` and `bench/out/NAME.png` (`TETHER_BENCH_OUT` moves them).
Progress bars write to stderr, so stdout stays the tables alone.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
) -> tqdm[T]:
    """A progress bar on stderr (use as an iterable wrapper, or `.update(n)` by hand)."""
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


@dataclass
class Chart:
    """One plot: a value per category for each series, as grouped bars or lines."""

    title: str
    ylabel: str
    categories: Sequence[Any]
    series: dict[str, Sequence[float]]
    kind: Literal["bar", "line"] = "bar"
    xlabel: str = ""
    log: bool = False
    # Horizontal reference lines (a goal, a baseline): label -> y.
    marks: dict[str, float] = field(default_factory=dict)


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
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    for ax, chart in zip(axes[0], charts, strict=False):
        _draw(ax, chart)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _draw(ax: Any, chart: Chart) -> None:
    labels = [str(c) for c in chart.categories]
    xs = list(range(len(labels)))
    names = list(chart.series)
    if chart.kind == "bar":
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            offset = (i - (len(names) - 1) / 2) * width
            ax.bar([x + offset for x in xs], list(chart.series[name]), width, label=name)
    else:
        for name in names:
            ax.plot(xs, list(chart.series[name]), marker="o", label=name)
    for label, y in chart.marks.items():
        ax.axhline(y, linestyle="--", color="gray", linewidth=1)
        ax.annotate(label, (0, y), textcoords="offset points", xytext=(2, 3), fontsize=8)
    ax.set_xticks(xs, labels)
    ax.set(title=chart.title, ylabel=chart.ylabel, xlabel=chart.xlabel)
    if chart.log:
        ax.set_yscale("log")
    if len(names) > 1:
        ax.legend(fontsize=8)
