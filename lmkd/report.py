"""The one report writer of ``lmkd evaluate`` and ``lmkd study``: a markdown table of models x
metrics, the JSON and markdown files (written atomically through :mod:`lmkd.io`), and the plot of
quality against latency.

Each caller decides what its rows and notes say (:func:`lmkd.evaluate.markdown_table`, the study's
:mod:`lmkd.study.results`); this module only lays them out and writes them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import LmkdError
from .io import atomic_write_json, atomic_write_text


def format_cell(value: float | None, spec: str = ".2f") -> str:
    """A number formatted for a table cell; ``None`` (not measured) is a dash."""
    return "–" if value is None else format(value, spec)


def markdown_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table: the header, its rule and one line per row (no trailing newline)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def check_writable(path: str, flag: str) -> None:
    """A one-line error, before any work, when the file ``path`` (given as ``flag``) could not be
    written at the end: it is a directory, a parent of it is a file, or the nearest existing parent
    directory is not writable (the missing ones would be made there)."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        raise LmkdError(f"{flag} {path} is a directory; give a file name, e.g. {os.path.join(path, 'eval.json')}")
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise LmkdError(f"{flag} {path} cannot be written: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LmkdError(f"{flag} {path} cannot be written: no permission to write in {parent}")


def write_report(result: dict, markdown: str, json_path: str, markdown_path: str) -> None:
    """``result`` as JSON into ``json_path`` and ``markdown`` into ``markdown_path``, each written
    atomically (the parent directories are made)."""
    for path in (json_path, markdown_path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_json(json_path, result, ensure_ascii=False)
    atomic_write_text(markdown_path, markdown)


@dataclass
class PlotPoint:
    """One model on the quality/latency plot."""

    label: str
    latency_ms: float
    score: float
    teacher: bool = False


def plot_quality_latency(points: Sequence[PlotPoint], path: str, *, ylabel: str, title: str) -> None:
    """A PNG scatter of score against latency (batch 1), one labelled point per model; the teacher
    is a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for p in points:
        ax.scatter([p.latency_ms], [p.score], s=40, marker="*" if p.teacher else "o")
        ax.annotate(p.label, (p.latency_ms, p.score), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.margins(0.2)  # room for the labels
    ax.set_xlabel("latency per example, batch 1 (ms)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
