"""compress's result written up: each model against the fp32 student (:func:`vs_student`), the
markdown report (:func:`markdown`) and ``compress.json`` / ``compress.md`` (:func:`write_report`,
through the shared writer :mod:`lmkd.evaluate.report`).
"""

from __future__ import annotations

import os

from lmkd.evaluate import report
from lmkd.evaluate import scores as evaluate_scores
from lmkd.evaluate import summary as evaluate_summary

#: the report's files inside the output directory
REPORT_JSON, REPORT_MD = "compress.json", "compress.md"


def vs_student(result: dict) -> dict:
    """Per model, against the fp32 student: bytes on disk (ratio), parameters (ratio), per-token and
    batch-1 speed-ups, and the primary metric's difference in points (model - student).

    Args:
        result: :func:`lmkd.evaluate.run.evaluate_models`'s result, with a ``student`` row.

    Returns:
        Label -> its comparison (every model but ``student`` and ``teacher``; a ratio is None
        where a size is unknown).
    """
    s = result["models"]["student"]
    primary = result["primary_metric"]
    out = {}
    for label, m in result["models"].items():
        if label in ("student", "teacher"):
            continue
        row: dict = {f"{primary}_difference": m["quality"][primary] - s["quality"][primary]}
        a, b = m["size"]["bytes_on_disk"], s["size"]["bytes_on_disk"]
        row["bytes_ratio"] = a / b if a and b else None
        a, b = m["size"]["parameters"], s["size"]["parameters"]
        row["parameters_ratio"] = a / b if a and b else None
        if "speed" in m and "speed" in s:
            if "ms_per_token" in m["speed"] and "ms_per_token" in s["speed"]:
                row["speedup_per_token"] = s["speed"]["ms_per_token"] / m["speed"]["ms_per_token"]
            row["speedup_latency"] = s["speed"]["latency_ms"] / m["speed"]["latency_ms"]
        out[label] = row
    return out


def markdown(result: dict) -> str:
    """evaluate's table of every model, then the comparison with the fp32 student and the steps.

    Args:
        result: :func:`compress_model`'s result.

    Returns:
        The report's markdown.
    """
    primary = result["primary_metric"]
    name = evaluate_scores.METRIC_NAMES[primary]
    vs = result["compress"]["vs_student"]
    per_token = any("speedup_per_token" in r for r in vs.values())
    head = ["model", f"{name} - student's", "bytes vs student", "parameters vs student"]
    head += (["speed-up per token vs student"] if per_token else []) + [
        "speed-up (batch 1) vs student"
    ]
    rows = []
    for label, r in vs.items():
        row = [
            label,
            format(r[f"{primary}_difference"], "+.2f"),
            _ratio(r["bytes_ratio"]),
            _ratio(r["parameters_ratio"]),
        ]
        row += ([_times(r.get("speedup_per_token"))] if per_token else []) + [
            _times(r.get("speedup_latency"))
        ]
        rows.append(row)
    lines = [
        "# lmkd compress",
        "",
        evaluate_summary.markdown_table(result),
        "## Against the fp32 student",
        "",
        report.markdown_table(head, rows),
        "",
        "## Steps",
        "",
    ]
    for step in result["compress"]["steps"]:
        lines.append("- " + ", ".join(f"{k}: {v}" for k, v in step.items()))
    heads = result["compress"]["pruning"].get("heads")
    if heads:
        lines.append(
            f"- heads kept per attention module (of {heads['removed_per_layer']} removed): "
            + "; ".join(f"{k} {v}" for k, v in heads["kept"].items())
        )
    return "\n".join(lines) + "\n"


def _ratio(x):
    return report.format_cell(x, ".3f")


def _times(x):
    return "–" if x is None else f"{x:.2f}x"


def write_report(result: dict, json_path: str) -> str:
    """``compress.json`` at ``json_path`` and ``compress.md`` beside it; returns the markdown.

    Args:
        result: :func:`compress_model`'s result.
        json_path: the JSON file to write.

    Returns:
        The markdown of :func:`markdown`.
    """
    text = markdown(result)
    report.write_report(
        result, text, json_path, os.path.join(os.path.dirname(json_path), REPORT_MD)
    )
    return text
