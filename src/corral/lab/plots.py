"""The lab's plots: bar panels, curves, and the tuning curve, as PNG files.

Drawn with matplotlib's object API on an Agg canvas (``Figure`` without
``pyplot``): no window, no global backend switch, safe to call from any
program. Every function takes plain numbers and a path, writes the PNG and
returns the path; ``None`` values are drawn as gaps, never as zeros.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.lab.tune import Trial

# matplotlib is imported where a figure is drawn (it is slow to import), but
# callers learn that it is missing here, from `from corral.lab import plots`,
# before any result is computed: they catch ImportError and draw nothing.
if importlib.util.find_spec("matplotlib") is None:
    raise ModuleNotFoundError(
        "corral's plots need matplotlib: pip install 'corral[lab]'", name="matplotlib"
    )

__all__ = ["Panel", "Series", "bar_panels", "line_panels", "tune_curve"]

GOOD = "#2b7bba"
BAD = "#d7301f"
MUTED = "#9e9e9e"
PALETTE = ["#2b7bba", "#f28e2b", "#59a14f", "#b07aa1", "#e15759", "#76b7b2", "#edc948", "#9c755f"]


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig: Any, path: Path) -> Path:
    from corral.lab.runner import replacing

    path.parent.mkdir(parents=True, exist_ok=True)
    # Whole or not at all: a full disk must not leave half a PNG behind.
    with replacing(path) as part:
        fig.savefig(part, format=path.suffix.removeprefix(".") or "png")
    return path


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2g}"


@dataclass
class Panel:
    """One bar panel: a value per label (``None``: not measured).

    ``colors`` overrides the color of some labels (e.g. failures in red).
    """

    title: str
    values: dict[str, float | None]
    unit: str = ""
    color: str = GOOD
    colors: dict[str, str] = field(default_factory=dict)
    log: bool = False


def bar_panels(path: Path, title: str, panels: Sequence[Panel], *, note: str = "") -> Path:
    """Horizontal bar panels side by side, sharing the labels (top to bottom in order)."""
    labels = list(dict.fromkeys(label for panel in panels for label in panel.values))
    fig = _figure(4.2 * len(panels) + 1.5, 0.45 * len(labels) + 1.6)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    positions = list(range(len(labels)))[::-1]
    for ax, panel in zip(axes, panels, strict=True):
        values = [panel.values.get(label) for label in labels]
        widths = [v if v is not None else 0.0 for v in values]
        colors = [panel.colors.get(label, panel.color) for label in labels]
        ax.barh(positions, widths, color=colors, height=0.65)
        top = max((v for v in values if v is not None), default=0.0)
        for y, value in zip(positions, values, strict=True):
            text = "n/a" if value is None else _fmt(value)
            ax.text(
                (value or 0.0) + top * 0.01 if not panel.log else max(value or 1.0, 1.0) * 1.05,
                y,
                f" {text}",
                va="center",
                fontsize=8,
                color=MUTED if value is None else "black",
            )
        positive = [v for v in values if v is not None and v > 0]
        if panel.log and positive:
            ax.set_xscale("log")
            ax.set_xlim(min(positive) / 3, top * 4)
        else:
            ax.set_xlim(0, top * 1.25 if top > 0 else 1)
        ax.set_title(panel.title + (f" ({panel.unit})" if panel.unit else ""), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.set_yticks(positions, labels, fontsize=9)
    fig.suptitle(title, fontsize=11)
    if note:
        fig.supxlabel(note, fontsize=8, color="#555555")
    return _save(fig, path)


@dataclass
class Series:
    """One curve: ``points`` are ``(x, y)``; ``y=None`` leaves a gap."""

    name: str
    points: list[tuple[float, float | None]]
    style: str = "-o"


def line_panels(
    path: Path,
    title: str,
    panels: Sequence[tuple[str, str, list[Series]]],
    *,
    xlabel: str,
    logx: bool = True,
    logy: Sequence[bool] | None = None,
    marks: dict[str, float] | None = None,
    note: str = "",
) -> Path:
    """Curves in panels side by side: each panel is ``(title, ylabel, series)``.

    ``marks`` draws labelled vertical lines at the same x on every panel.
    """
    fig = _figure(max(7.5, 5.2 * len(panels)), 4.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for index, (ax, (panel_title, ylabel, series)) in enumerate(zip(axes, panels, strict=True)):
        for k, curve in enumerate(series):
            xs = [x for x, _ in curve.points]
            ys = [math.nan if y is None else y for _, y in curve.points]
            ax.plot(xs, ys, curve.style, label=curve.name, color=PALETTE[k % len(PALETTE)], ms=4)
        if logx:
            ax.set_xscale("log")
        if logy is not None and logy[index]:
            ax.set_yscale("log")
        for k, (label, x) in enumerate((marks or {}).items()):
            ax.axvline(x, color=MUTED, linestyle=":", linewidth=1)
            ax.annotate(
                label,
                (x, 1.0 - 0.07 * (k + 1)),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                color="#555555",
                xytext=(3, 0),
                textcoords="offset points",
            )
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    if note:
        fig.supxlabel(note, fontsize=8, color="#555555")
    return _save(fig, path)


def tune_curve(trials: Sequence[Trial], recommended: int, path: Path, *, title: str) -> Path:
    """Throughput and p99 latency against the limit, the recommendation marked."""
    fig = _figure(7.5, 4.2)
    ax = fig.subplots()
    limits = [t.limit for t in trials]
    ax.plot(limits, [t.throughput for t in trials], "-o", color=GOOD, label="ok calls/s")
    failing = [t for t in trials if t.errors]
    if failing:
        ax.plot(
            [t.limit for t in failing],
            [t.throughput for t in failing],
            "x",
            color=BAD,
            ms=10,
            mew=2,
            label="trial with errors",
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(limits, [str(limit) for limit in limits])
    ax.minorticks_off()
    ax.set_xlabel("limit (calls in flight)")
    ax.set_ylabel("successful calls per second", color=GOOD)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.axvline(recommended, color="#59a14f", linestyle="--", linewidth=1.5)
    ax.annotate(
        f"recommended: {recommended}",
        (recommended, 0.04),
        xycoords=("data", "axes fraction"),
        xytext=(4, 0),
        textcoords="offset points",
        color="#2f6b2a",
        fontsize=9,
    )
    latency = ax.twinx()
    latency.plot(
        limits,
        [math.nan if t.p99_ms is None else t.p99_ms for t in trials],
        "--s",
        color="#f28e2b",
        ms=3,
        label="p99 latency",
    )
    latency.set_ylabel("p99 latency (ms)", color="#f28e2b")
    latency.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    more = latency.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper left")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)
