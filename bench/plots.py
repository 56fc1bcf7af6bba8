"""Plots with labelled axes and units (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def line_plot(path: Path, title: str, xlabel: str, ylabel: str,
              series: dict[str, tuple[list[float], list[float]]], *, logx: bool = False,
              hline: tuple[float, str] | None = None) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if hline:
        ax.axhline(hline[0], linestyle="--", color="grey", label=hline[1])
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def bar_plot(path: Path, title: str, ylabel: str, bars: dict[str, float],
             goal: tuple[float, str] | None = None) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    names = list(bars)
    ax.bar(names, [bars[n] for n in names], color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][: len(names)])
    if goal:
        ax.axhline(goal[0], linestyle="--", color="grey", label=goal[1])
        ax.legend()
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def cdf_plot(path: Path, title: str, xlabel: str, series: dict[str, list[float]]) -> str:
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    for label, values in series.items():
        if not values:
            continue
        ordered = sorted(values)
        ys = [(i + 1) / len(ordered) for i in range(len(ordered))]
        ax.plot(ordered, ys, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def grouped_bar_plot(path: Path, title: str, ylabel: str, groups: dict[str, dict[str, float]], *,
                     log: bool = False, hline: tuple[float, str] | None = None) -> str:
    """Bars side by side per group (e.g. measured / issue's figure / goal); a missing series is a gap."""
    series = list(dict.fromkeys(s for bars in groups.values() for s in bars))
    colours = {"measured": "#4c72b0", "measured, per server core": "#8fa8d6", "issue: main": "#dd8452",
               "goal": "#bbbbbb"}
    fig, ax = plt.subplots(figsize=(8.0, 4.2), dpi=110)
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ys = [bars.get(name, 0.0) or 0.0 for bars in groups.values()]
        bars = ax.bar(xs, ys, width, label=name, color=colours.get(name))
        for bar, y in zip(bars, ys, strict=True):
            if y:
                ax.annotate(f"{y:,.0f}" if y >= 100 else f"{y:.3g}", (bar.get_x() + bar.get_width() / 2, y),
                            ha="center", va="bottom", fontsize=7)
    if hline:
        ax.axhline(hline[0], linestyle="--", color="grey", label=hline[1])
    if log:
        ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), list(groups), rotation=20, ha="right")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name
