"""The causal-LM study's report: its figures (:func:`build_causal_report`, report.json) and
report.md / report.png (:func:`write_causal_report`).  The verdicts are :mod:`lmkd.study.verdicts`'
(paired bootstrap on ROUGE-L, every variant against SFT, surviving the seeds' spread)."""

from __future__ import annotations

import json
import os

from lmkd.core.io import atomic_write_json, read_rows
from lmkd.evaluate.report import markdown_table
from lmkd.study.causal_lm import VARIANT_SETTINGS
from lmkd.study.causal_lm_data import chat_column_of
from lmkd.study.causal_lm_eval import CAUSAL_METRIC, check_summary
from lmkd.study.options import StudyOptions
from lmkd.study.results import no_verdict
from lmkd.study.stopping import read_train_log
from lmkd.study.verdicts import (
    below_floor,
    ran_to_the_cap,
    seed_stats,
    significance,
    variant_groups,
)

#: how the report names each variant
CAUSAL_LABELS = {
    "sft": "SFT (gold responses, no teacher)",
    "seq-kd": "Seq-KD (SFT on the teacher's responses)",
    "fkl": "forward KL",
    "rkl": "reverse KL",
    "jsd": "JSD (β 0.5)",
    "skew-kl": "skew KL (α 0.1)",
    "taid": "TAID",
    "on-policy": "on-policy GKD (λ 0.5, JSD β 0.5)",
}

#: the columns of each model's row (quality.json's keys), with how the report names them
COLUMNS = {
    "rougeL": "ROUGE-L",
    "chrf": "chrF",
    "perplexity": "perplexity (gold responses)",
    "top1_agreement": "top-1 agreement with the teacher (%)",
    "kl_to_teacher": "KL(teacher‖model) per token",
}


def _row(name: str, model: dict, quality: dict, speed: dict, sizes: int) -> dict:
    log = read_train_log(model) if model["variant"] != "teacher" else None
    label = CAUSAL_LABELS.get(model["variant"], model["variant"])
    if sizes > 1 and model["size"] is not None:
        label += f", {model['size']:g} of the layers"
    return {
        "model": name,
        "variant": model["variant"],
        "label": "the teacher" if model["variant"] == "teacher" else label,
        "size": model["size"],
        "seed": model["seed"],
        "score": quality["greedy"][CAUSAL_METRIC],
        **{k: quality["greedy"][k] if k in quality["greedy"] else quality[k] for k in COLUMNS},
        "parameters": quality["parameters"],
        "bytes_on_disk": quality["bytes_on_disk"],
        "ms_per_token": speed[name]["ms_per_token"],
        "steps": log["steps"] if log else None,
        "stopped_early": log["stopped_early"] if log else None,
        "best_step": log["best_step"] if log else None,
        "curve": log["curve"] if log else None,
        "curve_greater_is_better": True if log else None,
    }


def _groups(rows: list[dict]) -> list[dict]:
    def columns(rs: list[dict]) -> dict:
        return {k: dict(zip(("mean", "std"), seed_stats([r[k] for r in rs]))) for k in COLUMNS}

    return variant_groups(rows, columns, ("ms_per_token", "steps", "parameters"), every_seed=False)


def build_causal_report(
    opts: StudyOptions, models: dict, results: dict, speed: dict, data: dict, floors: dict
) -> dict:
    """report.json of a causal-LM study.

    Args:
        opts: the resolved options.
        models: ``{name: {"dir", "stage", "variant", "size", "seed"}}``, the teacher first.
        results: ``{name: quality.json}``.
        speed: ``{name: speed figures}``.
        data: the data stages' paths (``train``, ``validation``, ``test``, ``check_dir``, ``inits``).
        floors: the trivial answers' ROUGE-L on the test rows.

    Returns:
        The report.
    """
    plan = opts.plan
    sizes = len(opts.student_sizes)
    rows = [_row(n, m, results[n], speed, sizes) for n, m in models.items()]
    groups = _groups(rows)
    teacher = next(g for g in groups if g["variant"] == "teacher")
    refs = [r["completion"] for r in read_rows(data["test"])]
    preds = {n: results[n]["predictions"] for n in models}
    sig = significance("causal-lm", groups, teacher, preds, refs, "greedy")
    below = below_floor(groups, floors, CAUSAL_METRIC)
    if below:
        sig["verdicts"].insert(1 if sig["weak_teacher"] else 0, below)
    at_cap = ran_to_the_cap(rows)
    if at_cap:
        sig["verdicts"].insert(bool(sig["weak_teacher"]) + bool(below), at_cap)
    nothing = no_verdict(groups, "ROUGE-L", teacher["score_mean"])
    if nothing:  # the warnings stay; the line replaces one line per comparison
        warnings = sig["verdicts"][: len(sig["verdicts"]) - len(sig["comparisons"])]
        sig["verdicts"], sig["no_verdict"] = warnings + [nothing], nothing
    check = None
    path = os.path.join(data.get("check_dir", ""), "teacher_check.json")
    if os.path.isfile(path):
        with open(path) as f:
            check = json.load(f)
    inits = []
    for i in data.get("inits", []):
        with open(os.path.join(i["dir"], "init.json")) as f:
            inits.append({"size": i["size"], "seed": i["seed"], **json.load(f)})
    transfer = os.path.join(os.path.dirname(os.path.dirname(data["train"])), "transfer")
    memo = os.path.join(transfer, "memorisation.json")
    n_train = len(read_rows(data["train"]))
    seen = plan.student_steps * plan.batch_size
    passes = (
        f"at the cap ({plan.student_steps} steps of {plan.batch_size}) a student sees {seen / n_train:.2f} "
        f"passes over them"
        + (f" -- {min(seen, n_train):,} rows at most, not all" if seen < n_train else "")
    )
    notes = list(plan.notes) + [
        f"Every student's training data holds all {n_train:,} training rows, drawn in a random order; "
        f"{passes}. Its loss covers the response tokens (and EOS) only -- the prompt's label positions "
        "are ignored by both the CE and the KD term.",
        f"The KD variants mix the gold CE and the divergence at kd_alpha {plan.kd_alpha:g} (temperature "
        f"{plan.kd_temperature:g}); on-policy GKD's sampled batches (half of them) get the JSD alone.",
        f"Every student stops when the ROUGE-L of its greedy responses to the validation prompts has not "
        f"risen by {plan.metric_min_delta:g} for {plan.patience} evaluations ({plan.eval_every} steps "
        f"apart; cap {plan.student_steps} steps) and keeps its best weights.",
    ]
    return {
        "task": "causal-lm",
        "budget": opts.budget,
        "data": {k: getattr(opts, k) for k in ("train", "validation", "test")}
        | {
            "prompt_column": opts.source_column,
            "completion_column": opts.target_column,
            "instruction": opts.instruction,
        }
        | {"train_rows": n_train}
        | {f"{s}_rows": len(read_rows(data[s])) for s in ("validation", "test")}
        | {"chat_column": chat_column_of(opts.train, opts.source_column)},
        "teacher": opts.teacher
        or "trained from scratch (Llama-style, {d_model}-wide, {layers} layers, {heads} heads)".format(
            **plan.teacher
        ),
        "teacher_check": check,
        "variants": {
            v: VARIANT_SETTINGS[v]
            for v in dict.fromkeys(g["variant"] for g in groups)
            if v != "teacher"
        },
        "student_inits": inits,
        "seq_kd_identical_to_gold": json.load(open(memo))["identical"]
        if os.path.isfile(memo)
        else None,
        "plan": plan.to_dict(),
        "seeds": opts.seeds,
        "floors": floors,
        "rows": rows,
        "groups": groups,
        "significance": sig,
        "notes": notes,
    }


def _cell(mean: float | None, std: float | None, spec: str = ".1f") -> str:
    if mean is None:
        return "–"
    return format(mean, spec) + (f" ± {format(std, spec)}" if std is not None else "")


def report_markdown(report: dict) -> str:
    """report.md of a causal-LM study.

    Args:
        report: :func:`build_causal_report`'s report.

    Returns:
        The markdown.
    """
    sig, plan = report["significance"], report["plan"]
    d = report["data"]
    lines = [
        "# lmkd study: causal-lm",
        "",
        f"Budget **{report['budget']}**; {d['train_rows']} training, {d['validation_rows']} validation and "
        f"{d['test_rows']} test rows ("
        + (
            f"chat rows, column `{d['chat_column']}`: the last assistant turn is the response, the "
            "turns before it the prompt, rendered `role: content`"
            if d.get("chat_column")
            else f"prompt column `{d['prompt_column']}`, response column `{d['completion_column']}`"
        )
        + f"); {report['seeds']} seed(s) per variant.",
        "",
        f"Teacher: {report['teacher']}. Teacher check: "
        + (check_summary(report["teacher_check"]) if report["teacher_check"] else "none")
        + ".",
        "",
        "## Verdicts (test rows, ROUGE-L of greedy responses, paired bootstrap)",
        "",
        *[f"- {v}" for v in sig["verdicts"]],
        "",
        "## Models",
        "",
    ]
    head = ["model", *COLUMNS.values(), "params (M)", "ms/token", "steps"]
    table = []
    for g in report["groups"]:
        c = g["columns"]
        spec = {"perplexity": ".2f", "kl_to_teacher": ".3f"}
        steps = "–" if g["steps_mean"] is None else f"{g['steps_mean']:.0f}"
        table.append(
            [
                g["label"],
                *[_cell(c[k]["mean"], c[k]["std"], spec.get(k, ".1f")) for k in COLUMNS],
                f"{g['parameters_mean'] / 1e6:.2f}",
                _cell(g["ms_per_token_mean"], None, ".2f"),
                steps,
            ]
        )
    lines += [markdown_table(head, table), ""]
    floors = "; ".join(f"{k}: {v:.1f}" for k, v in report["floors"].items())
    lines += [f"Trivial answers' ROUGE-L on the test rows: {floors}.", ""]
    inits = report["student_inits"]
    if inits:
        i = inits[0]
        lines += [
            f"Students: teacher layers {i['layers']['layers']} of {i['teacher_layers']} copied "
            f"({i['parameters_vs_teacher']:.0%} of the teacher's parameters).",
            "",
        ]
    if report.get("seq_kd_identical_to_gold") is not None:
        lines += [
            f"Seq-KD's targets: {report['seq_kd_identical_to_gold']:.0%} of the teacher's responses "
            "to the training prompts equal the gold response.",
            "",
        ]
    lines += ["## Notes", "", *[f"- {n}" for n in report["notes"]]]
    keys = ("teacher_steps", "student_steps", "batch_size", "max_length", "max_new_tokens", "beams")
    lines += ["", f"Plan: {json.dumps({k: plan[k] for k in keys})}"]
    return "\n".join(lines) + "\n"


def write_causal_report(report: dict, out: str) -> None:
    """report.json, report.md and report.png (scores and speed, validation curves) into ``out``.

    Args:
        report: :func:`build_causal_report`'s report.
        out: the directory.
    """
    from lmkd.evaluate.report import Curve, PlotPoint, plot_quality_speed

    atomic_write_json(os.path.join(out, "report.json"), report)
    with open(os.path.join(out, "report.md"), "w", encoding="utf-8") as f:
        f.write(report_markdown(report))
    points = [
        PlotPoint(
            label=g["label"],
            speed=g["ms_per_token_mean"],
            score=g["score_mean"],
            teacher=g["variant"] == "teacher",
            score_err=(g["score_std"], g["score_std"]) if g["score_std"] is not None else None,
        )
        for g in report["groups"]
    ]
    curves = [
        Curve(r["label"], [c["step"] for c in r["curve"]], [c["metric"] for c in r["curve"]])
        for r in report["rows"]
        if r.get("curve") and r["seed"] == min(x["seed"] or 0 for x in report["rows"] if x["seed"])
    ]
    plot_quality_speed(
        points,
        os.path.join(out, "report.png"),
        xlabel="ms per token (batch 1, greedy)",
        ylabel="ROUGE-L",
        title="test ROUGE-L of greedy responses",
        curves=curves,
        curve_ylabel="validation ROUGE-L",
        floor=max(report["floors"].items(), key=lambda kv: kv[1]) if report.get("floors") else None,
    )
