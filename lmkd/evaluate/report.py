"""The one report writer of ``lmkd evaluate`` and ``lmkd study``: a markdown table of models x
metrics, the JSON and markdown files (written atomically through :mod:`lmkd.core.io`), and the plot of
quality against speed (with error bars, and the students' validation curves beside it).

Each caller decides what its rows and notes say (:func:`lmkd.evaluate.summary.markdown_table`, the study's
:mod:`lmkd.study.results`); this module only lays them out and writes them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from lmkd.core.io import atomic_write_json, atomic_write_text


def format_cell(value: float | None, spec: str = ".2f") -> str:
    """A number formatted for a table cell.

    Args:
        value: the number, or None (not measured).
        spec: the format spec (``format(value, spec)``).

    Returns:
        The formatted number; a dash for None.
    """
    return "–" if value is None else format(value, spec)


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table: the header, its rule and one line per row (no trailing newline).

    Args:
        head: the column names.
        rows: the cells of each row, already formatted.

    Returns:
        The table's text.
    """
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(result: dict, markdown: str, json_path: str, markdown_path: str) -> None:
    """Write ``result`` as JSON into ``json_path`` and ``markdown`` into ``markdown_path``, each written
    atomically (the parent directories are made).

    Args:
        result: the JSON-serialisable result (written with ``ensure_ascii=False``).
        markdown: the markdown report's text.
        json_path: where the JSON goes.
        markdown_path: where the markdown goes.

    Returns:
        None.
    """
    for path in (json_path, markdown_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_json(json_path, result, ensure_ascii=False)
    atomic_write_text(markdown_path, markdown)


@dataclass
class PlotPoint:
    """One model on the quality/speed plot.

    Args:
        label: the model's name in the legend and on the score panel.
        speed: x: ms per token, or per example.
        score: y: the quality score.
        teacher: drawn as a black star.
        score_err: (below, above) lengths of its score error bar, or None.
        speed_err: (below, above) lengths of its speed error bar, or None.
    """

    label: str
    speed: float
    score: float
    teacher: bool = False
    score_err: tuple[float, float] | None = None
    speed_err: tuple[float, float] | None = None


@dataclass
class Curve:
    """One line on the validation-curve panel: ``values`` at training ``steps``.

    Args:
        label: the line's name in the legend.
        steps: the training steps.
        values: the validation value at each step.
    """

    label: str
    steps: Sequence[int]
    values: Sequence[float]


def padded_range(
    lo: float, hi: float, min_span: float, floor: float | None = None
) -> tuple[float, float]:
    """An axis range holding ``lo``..``hi`` with 10% margins, at least ``min_span`` wide (centred on
    the data), starting at ``floor`` (less a 3% sliver) when it would go below: a plot of scores
    0.004 apart does not fill the axis with noise.

    Args:
        lo: the lowest value to show.
        hi: the highest value to show.
        min_span: the narrowest the range may be.
        floor: the lowest the range may start (a sliver below it, so markers on it show), or None.

    Returns:
        ``(start, end)`` of the axis.
    """
    span = max(hi - lo, 0.0)
    width = max(span * 1.2, min_span)
    mid = (lo + hi) / 2
    a, b = mid - width / 2, mid + width / 2
    if (
        floor is not None and a < floor
    ):  # start at the floor, with a sliver below it so markers on it show
        a, b = floor - 0.03 * width, floor + 0.97 * width
    return a, b


_MARKERS = "osD^vP<>Xh"


def plot_quality_speed(
    points: Sequence[PlotPoint],
    path: str,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    min_score_span: float = 5.0,
    curves: Sequence[Curve] = (),
    curve_ylabel: str = "",
    curve_title: str = "students' validation curves",
    note: str = "",
    floor: tuple[str, float] | None = None,
) -> None:
    """A PNG of up to three panels.

    The panels: each model's score with its error bars, one row per model (students of one size
    share an architecture, so on a speed axis they sit on top of each other); score against speed,
    one marker per model in a legend (no labels on the points, so none overlap; the teacher is a
    black star); and with ``curves`` the validation curves.  Score axes span at least
    ``min_score_span`` points, the speed axis at least 30% of the slowest model.

    Args:
        points: the models, in the order of the score panel's rows (top to bottom).
        path: the PNG to write (its directory is made).
        xlabel: the speed axis's label.
        ylabel: the score axis's label.
        title: the score panel's title.
        min_score_span: the narrowest score axis, in score points.
        curves: the validation curves (a third panel when any).
        curve_ylabel: the curve panel's y label.
        curve_title: the curve panel's title.
        note: printed under the plot (what the error bars are).
        floor: ``(what, score)`` of the best trivial answer, drawn as a dashed line on both score
            axes (a model below it did not learn to use its inputs), or None.

    Returns:
        None.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    panels = 3 if curves else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.6 * panels, 5.2), dpi=110, squeeze=False)
    bars, ax = axes[0][0], axes[0][1]
    colours = plt.get_cmap("tab10")
    styles, student = [], 0
    for p in points:
        if p.teacher:
            styles.append(dict(marker="*", color="black", markersize=14))
        else:
            styles.append(
                dict(
                    marker=_MARKERS[student % len(_MARKERS)],
                    color=colours(student % 10),
                    markersize=8,
                )
            )
            student += 1
    lows = [p.score - (p.score_err[0] if p.score_err else 0) for p in points]
    highs = [p.score + (p.score_err[1] if p.score_err else 0) for p in points]
    if floor is not None:
        lows, highs = lows + [floor[1]], highs + [floor[1]]
    score_range = padded_range(min(lows), max(highs), min_score_span, floor=0.0) if points else None
    line = dict(color="grey", linestyle="--", linewidth=1)
    # panel 1: the scores, one row per model (top to bottom in the given order)
    for i, (p, style) in enumerate(zip(points, styles)):
        xerr = None if p.score_err is None else [[p.score_err[0]], [p.score_err[1]]]
        bars.errorbar([p.score], [i], xerr=xerr, linestyle="none", capsize=4, **style)
    if floor is not None:
        bars.axvline(floor[1], **line)  # named in the speed panel's legend
    bars.set_yticks(range(len(points)), [p.label for p in points], fontsize=8)
    bars.set_ylim(len(points) - 0.5, -0.5)
    if score_range:
        bars.set_xlim(*score_range)
    bars.set_xlabel(ylabel)
    bars.set_title(title, fontsize=10)
    bars.grid(alpha=0.3, axis="x")
    # panel 2: score against speed
    for p, style in zip(points, styles):
        yerr = None if p.score_err is None else [[p.score_err[0]], [p.score_err[1]]]
        xerr = None if p.speed_err is None else [[p.speed_err[0]], [p.speed_err[1]]]
        ax.errorbar(
            [p.speed],
            [p.score],
            yerr=yerr,
            xerr=xerr,
            linestyle="none",
            capsize=3,
            label=p.label,
            **style,
        )
    if floor is not None:
        ax.axhline(floor[1], label=f"trivial floor: {floor[0]}", **line)
    if points:
        ax.set_ylim(*score_range)
        xs_lo = [p.speed - (p.speed_err[0] if p.speed_err else 0) for p in points]
        xs_hi = [p.speed + (p.speed_err[1] if p.speed_err else 0) for p in points]
        ax.set_xlim(*padded_range(min(xs_lo), max(xs_hi), 0.3 * max(xs_hi), floor=0.0))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("quality against speed (left: faster)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    if curves:
        cx = axes[0][2]
        for i, c in enumerate(curves):
            cx.plot(list(c.steps), list(c.values), marker=".", color=colours(i % 10), label=c.label)
        cx.set_xlabel("training step")
        cx.set_ylabel(curve_ylabel)
        cx.set_title(curve_title, fontsize=10)
        cx.grid(alpha=0.3)
        cx.legend(
            fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False
        )
    if note:
        fig.text(0.01, 0.005, note, fontsize=7, ha="left", va="bottom", wrap=True)
    fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
    fig.savefig(path, format="png")
    plt.close(fig)
