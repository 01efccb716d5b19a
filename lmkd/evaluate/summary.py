"""``lmkd evaluate``'s result written up: one markdown row per model (quality, fidelity, size, speed
and, with a teacher, retained quality and speed-ups) with its notes, the plot of quality against
speed, and the JSON and ``.md`` files, through the shared writer :mod:`lmkd.evaluate.report`.
"""

from __future__ import annotations

import os

from lmkd.core.constants import LM_EVAL_TASKS
from lmkd.core.errors import LmkdError
from lmkd.evaluate import report
from lmkd.evaluate.report import format_cell
from lmkd.evaluate.scores import METRIC_NAMES
from lmkd.models.truncation import describe_truncation
from lmkd.scoring import timing


def markdown_table(result: dict) -> str:
    """One row per model: quality, size, speed and, with a teacher, retained quality and speed-up,
    followed by the notes (data, fidelity, signatures, truncation, speed).

    Args:
        result: what :func:`lmkd.evaluate.run.evaluate_models` returns.

    Returns:
        The markdown table and its notes.
    """
    names = list(next(iter(result["models"].values()))["quality"])
    primary = result["primary_metric"]
    has_speed = all("speed" in m for m in result["models"].values())
    per_token = has_speed and all("ms_per_token" in m["speed"] for m in result["models"].values())
    has_len = all("output_tokens" in m for m in result["models"].values())
    has_teacher = result["teacher"] is not None
    # models run by an inference engine have no logits for teacher-forced scores: a dash in their row
    has_fidelity = has_teacher and any(
        "top1_agreement" in m.get("fidelity", {}) for m in result["models"].values()
    )
    seq2seq = result["task"] not in LM_EVAL_TASKS + ("classification",)
    bs = result["settings"]["batch_size"]
    fixed = result["settings"].get("fixed_new_tokens")
    head = ["model"] + [METRIC_NAMES[n] for n in names]
    if has_fidelity:
        head += (["perplexity (teacher-forced)"] if seq2seq else []) + [
            "top-1 agreement %",
            "KL to teacher",
        ]
    head += ["parameters", "MB on disk"]
    if has_len:
        head += ["output tokens (mean)"]
    if per_token:
        head += [f"ms/token ({fixed} tokens, batch 1)"]
    if has_speed:
        head += ["latency ms (batch 1)", f"examples/s (batch {bs})"]
    if has_teacher:
        head += [f"{METRIC_NAMES[primary]} retained %"]
        if per_token:
            head += ["speed-up per token"]
        if has_speed:
            head += ["speed-up (batch 1)", f"speed-up (batch {bs})"]
    rows = []
    for label, m in result["models"].items():
        size = m["size"]
        row = [label] + [format_cell(m["quality"][n]) for n in names]
        if has_fidelity:
            f = m.get("fidelity", {})
            row += ([format_cell(f.get("perplexity"))] if seq2seq else []) + [
                format_cell(f.get("top1_agreement")),
                format_cell(f.get("kl_to_teacher"), ".4f"),
            ]
        row += [
            format_cell(size["parameters"], ","),
            format_cell(
                size["bytes_on_disk"] / 1e6 if size["bytes_on_disk"] is not None else None, ".1f"
            ),
        ]
        if has_len:
            row += [format_cell(m["output_tokens"]["mean"], ".1f")]
        if per_token:
            row += [format_cell(m["speed"]["ms_per_token"], ".2f")]
        if has_speed:
            row += [
                format_cell(m["speed"]["latency_ms"], ".1f"),
                format_cell(m["speed"]["throughput_per_s"], ".1f"),
            ]
        if has_teacher:
            vs = m.get("vs_teacher")
            row += [format_cell(vs["retained_%"][primary], ".1f") if vs else "100 (teacher)"]
            if per_token:
                row += [f"{vs['speedup_per_token']:.2f}x" if vs else "1x"]
            if has_speed:
                row += [
                    f"{vs['speedup_latency']:.2f}x" if vs else "1x",
                    f"{vs['speedup_throughput']:.2f}x" if vs else "1x",
                ]
        rows.append(row)
    s = result["settings"]
    notes = [
        f"{result['task']} on {result['data']} ({result['n_examples']} examples)"
        + (f", beam {s['num_beams']}, max {s['max_new_tokens']} new tokens" if seq2seq else "")
        + (
            f", {s['mlm_probability']:g} of the tokens masked (seed {s['seed']})"
            if result["task"] == "mlm"
            else ""
        )
        + f", {s['device']}."
    ]
    if has_fidelity:
        n = next(
            m["fidelity"]["tokens"]
            for m in result["models"].values()
            if "top1_agreement" in m.get("fidelity", {})
        )
        notes.append(
            f"Fidelity over {n} scored tokens"
            + (" (teacher-forced on the references)" if seq2seq else "")
            + ": top-1 agreement = % of positions where the model's argmax is the teacher's; "
            "KL to teacher = mean KL(teacher || model) per token, nats."
        )
    for k, sig in result["signatures"].items():
        notes.append(f"{k} signature: {sig}")
    for label, m in result["models"].items():  # only what the one truncation rule actually cut
        notes += [
            f"{label}: {describe_truncation(n)}."
            for n in m.get("truncation", {}).values()
            if n["truncated"]
        ]
    if has_speed:
        sp = next(iter(result["models"].values()))["speed"]
        notes.append(
            f"Speed: median of {sp['repeats']} interleaved repeats after warm-up; latency over "
            f"{sp['latency_examples']} examples one at a time, throughput over {sp['throughput_examples']}."
        )
        busy = timing.busy_warning(sp)
        if busy:
            notes.append(busy)
        if per_token:
            notes.append(
                f"ms/token: greedy decoding of exactly {fixed} new tokens per example (EOS held off), batch 1, "
                "the same latency examples -- the architecture's speed, whatever the length of a model's "
                "own outputs; latency per example also counts how long those outputs are "
                "(output tokens: mean over the scored rows)."
            )
    return report.markdown_table(head, rows) + "\n\n" + "\n".join(f"- {n}" for n in notes) + "\n"


def plot_quality_latency(result: dict, path: str, metric: str | None = None) -> None:
    """A plot of ``metric`` against speed, one marker per model in a legend: ms per token at a
    fixed output length when measured (seq2seq), else latency per example.

    Args:
        result: what :func:`lmkd.evaluate.run.evaluate_models` returns.
        path: the PNG to write.
        metric: the quality metric (default: the primary one).

    Raises:
        LmkdError: the result has no speed measurements.
    """
    metric = metric or result["primary_metric"]
    if not all("speed" in m for m in result["models"].values()):
        raise LmkdError("--plot needs speed measurements; do not pass --speed-samples 0")
    per_token = all("ms_per_token" in m["speed"] for m in result["models"].values())
    key = "ms_per_token" if per_token else "latency_ms"
    points = [
        report.PlotPoint(label, m["speed"][key], m["quality"][metric], m["role"] == "teacher")
        for label, m in result["models"].items()
    ]
    xlabel = (
        f"ms per token, {result['settings']['fixed_new_tokens']} tokens forced, batch 1"
        if per_token
        else "latency per example, batch 1 (ms)"
    )
    report.plot_quality_speed(
        points,
        path,
        xlabel=xlabel,
        ylabel=METRIC_NAMES.get(metric, metric),
        title=f"{result['task']}: quality against speed",
    )


def write_report(result: dict, output: str | None = None, plot: str | None = None) -> str:
    """Write ``output`` (JSON), the markdown table next to it (``.md``) and ``plot`` (PNG); return
    the markdown.

    Args:
        result: what :func:`lmkd.evaluate.run.evaluate_models` returns.
        output: the JSON file (None: not written).
        plot: the PNG of :func:`plot_quality_latency` (None: not drawn).

    Returns:
        The markdown of :func:`markdown_table`.

    Raises:
        LmkdError: a plot without speed measurements.
    """
    table = markdown_table(result)
    if output:
        report.write_report(result, table, output, os.path.splitext(output)[0] + ".md")
    if plot:
        plot_quality_latency(result, plot)
    return table
