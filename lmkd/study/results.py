"""The study's report: one row per model with its quality, size and latency against the teacher's,
written as report.json / report.md / report.png by the shared writer :mod:`lmkd.report`."""

from __future__ import annotations

import json
import os

from ..io import read_rows
from ..report import PlotPoint, markdown_table, plot_quality_latency, write_report
from .plan import StudyOptions


def _main_metric(task: str) -> tuple[str, list[tuple[str, str]]]:
    """(headline metric key, [(column label, key path)])."""
    if task == "classification":
        return "accuracy", [("accuracy", "accuracy"), ("macro-F1", "macro_f1")]
    if task == "summarization":
        return "beam.rouge2", [("ROUGE-2 greedy", "greedy.rouge2"), ("ROUGE-L greedy", "greedy.rougeL"),
                               ("ROUGE-2 beam", "beam.rouge2"), ("ROUGE-L beam", "beam.rougeL")]
    return "beam.bleu", [("BLEU greedy", "greedy.bleu"), ("chrF greedy", "greedy.chrf"),
                         ("BLEU beam", "beam.bleu"), ("chrF beam", "beam.chrf")]


def _get(d: dict, path: str):
    for k in path.split("."):
        d = d[k]
    return d


def build_report(opts: StudyOptions, models: dict, results: dict, speed: dict, data: dict) -> dict:
    """The report: the plan, the data sizes and one row per model (quality, size, latency, and each
    against the teacher) from the eval stages' ``results`` and the speed stage's ``speed``."""
    plan = opts.plan
    main, cols = _main_metric(opts.task)
    t_params = results["teacher"]["parameters"]
    t_lat = speed["teacher"]["latency_ms"]
    t_score = _get(results["teacher"], main)
    info = {}
    for split in ("train", "validation", "test"):
        with open(os.path.join(data[f"{split}_dir"], "info.json")) as f:
            split_info = json.load(f)
        info[f"{split}_rows"] = split_info["rows"]
        if "labels" in split_info:
            info["labels"] = split_info["labels"]
    if "transfer_rows" in data:
        info["transfer_rows"] = len(read_rows(data["transfer_rows"]))
    rows = []
    for name, m in models.items():
        r = results[name]
        sp = speed[name]
        rows.append({
            "model": name, "variant": m["variant"], "size": m["size"], "path": os.path.abspath(m["dir"]),
            "parameters": r["parameters"], "parameters_vs_teacher": r["parameters"] / t_params,
            "quality": {k: v for k, v in r.items() if k not in ("parameters", "predictions")},
            "main_metric": main, "score": _get(r, main),
            "score_vs_teacher": (_get(r, main) / t_score) if t_score else None,
            "latency_ms": sp["latency_ms"], "throughput_per_s": sp["throughput_per_s"],
            "speedup": t_lat / sp["latency_ms"] if sp["latency_ms"] else None,
        })
    return {"task": opts.task, "budget": opts.budget, "plan": plan,
            "data": {"train": opts.train, "validation": opts.validation, "test": opts.test, **info},
            "teacher": opts.teacher or "trained from scratch", "columns": [c for c, _ in cols],
            "column_keys": [k for _, k in cols], "speed_setup": {k: v for k, v in speed["teacher"].items()
                                                               if k not in ("latency_ms", "throughput_per_s")},
            "rows": rows}


def _main_label(report: dict) -> str:
    return report["columns"][report["column_keys"].index(report["rows"][0]["main_metric"])]


def report_markdown(report: dict) -> str:
    """``report.md``: a title, the table of models and notes saying how it was measured."""
    keys = report["column_keys"]
    head = ["model", "params", "size"] + report["columns"] + ["latency ms", "speed-up",
                                                              f"{_main_label(report)} vs teacher"]
    rows = []
    for r in report["rows"]:
        vals = [r["model"], f"{r['parameters'] / 1e6:.2f}M", f"{r['parameters_vs_teacher']:.0%}"]
        vals += [f"{_get(r['quality'], k):.1f}" for k in keys]
        vals += [f"{r['latency_ms']:.1f}", f"{r['speedup']:.2f}x",
                 f"{r['score_vs_teacher']:.0%}" if r["score_vs_teacher"] is not None else "-"]
        rows.append(vals)
    plan = report["plan"]
    d = report["data"]
    sp = report["speed_setup"]
    notes = [
        f"# lmkd study: {report['task']} ({report['budget']} budget)", "",
        markdown_table(head, rows), "",
        f"Teacher: {report['teacher']}. Data: {d.get('train_rows')} training rows"
        + (f" ({d['transfer_rows']} in the transfer set every student learns from)" if "transfer_rows" in d else "")
        + f", {d.get('validation_rows')} validation, {d.get('test_rows')} test rows.",
        f"Students: {plan['student_steps']} steps each, batch {plan['batch_size']}, lr {plan['student_lr']}; "
        f"word-level KD alpha {plan['kd_alpha']}, temperature {plan['kd_temperature']}."
        + ("" if report["task"] == "classification" else f" Beam size {plan['beams']}."),
        f"Latency: ms per example at batch size 1 ({'beam search' if report['task'] != 'classification' else 'forward'}), "
        f"median of {sp.get('repeats')} rounds over {sp.get('latency_examples')} examples, models interleaved; "
        "speed-up = teacher latency / model latency.",
    ]
    return "\n".join(notes) + "\n"


def write_study_report(report: dict, out: str) -> None:
    """``report.json``, ``report.md`` and ``report.png`` (quality against latency) into ``out``."""
    write_report(report, report_markdown(report), os.path.join(out, "report.json"), os.path.join(out, "report.md"))
    points = [PlotPoint(r["model"], r["latency_ms"], r["score"], r["model"] == "teacher") for r in report["rows"]]
    plot_quality_latency(points, os.path.join(out, "report.png"), ylabel=_main_label(report),
                         title=f"lmkd study: {report['task']} ({report['budget']} budget)")
