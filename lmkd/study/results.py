"""The study's report (:func:`build_report`): verdict lines first (the paired bootstrap of every student
variant against the baseline, the teacher and the best student: :mod:`lmkd.study.verdicts`), one row per
model with its quality, size, output length and speed against the teacher's, and per variant the mean ±
std over seeds; written as report.json / report.md / report.png by :mod:`lmkd.study.report_writer`.

What it reads, and from whom:

* ``models``: ``{name: {"dir", "stage", "variant", "size", "seed"?, "train_log"?}}`` (the teacher is
  ``"teacher"``); with several seeds per variant the names are ``{size}-{variant}`` for the first
  seed and ``{size}-{variant}-seed{k}`` for the others, and the rows are grouped by (size, variant);
* ``results``: each eval stage's ``quality.json`` -- the scores, and ``predictions`` (greedy/beam
  texts, or class ids) on the test rows, which the significance tests resample;
* ``speed``: the speed stage's per-model figures (latency per example, throughput and, seq2seq,
  ``ms_per_token`` at ``fixed_new_tokens`` forced tokens);
* ``train_log.json`` in a student's stage dir (optional): ``{"steps", "stopped_early", "curve":
  [{"step", "metric"}], "metric"}`` -- the steps column and the validation-curve panel.
"""

from __future__ import annotations

import json
import os

from lmkd.core.io import read_rows
from lmkd.models.generation import output_lengths
from lmkd.models.loading import load_tokenizer
from lmkd.study.checks import trivial_floors
from lmkd.study.options import StudyOptions
from lmkd.study.plan import FORMAT_NAMES
from lmkd.study.stopping import read_train_log
from lmkd.study.teachers import scratch_teacher
from lmkd.study.verdicts import (
    METRIC_LABELS,
    below_floor,
    ran_to_the_cap,
    seed_stats,
    served_sources,
    significance,
    variant_groups,
)

VARIANT_NAMES = {
    "baseline": "the baseline",
    "word-kd": "Word-KD",
    "seq-kd": "Seq-KD",
    "seq-kd+word-kd": "Seq-KD + Word-KD",
    "seq-inter": "Seq-Inter",
    "no-kd": "fine-tuning alone",
    "task-kd": "task KD",
    "distilbert": "MLM-distil + fine-tune",
    "distilbert+task-kd": "MLM-distil + task KD",
    "teacher": "the teacher",
}

#: how the validation metric of train_log.json is named in the notes and on the curve panel
CURVE_METRICS = {
    "eval_loss_ce": "validation CE on the gold targets (nats)",
    "eval_bleu": "validation BLEU (greedy)",
    "eval_rougeL": "validation ROUGE-L (greedy)",
    "eval_accuracy": "validation accuracy",
}


def _main_metric(task: str) -> tuple[str, list[tuple[str, str]]]:
    """(headline metric key, [(column label, key path)])."""
    if task == "classification":
        return "accuracy", [("accuracy", "accuracy"), ("macro-F1", "macro_f1")]
    if task == "summarization":
        return "beam.rouge2", [
            ("ROUGE-2 greedy", "greedy.rouge2"),
            ("ROUGE-L greedy", "greedy.rougeL"),
            ("ROUGE-2 beam", "beam.rouge2"),
            ("ROUGE-L beam", "beam.rougeL"),
        ]
    return "beam.bleu", [
        ("BLEU greedy", "greedy.bleu"),
        ("chrF greedy", "greedy.chrf"),
        ("BLEU beam", "beam.bleu"),
        ("chrF beam", "beam.chrf"),
    ]


def value_at(d: dict, path: str):
    """The value at ``path`` in nested dicts.

    Args:
        d: nested dicts.
        path: keys joined by dots (``beam.bleu``).

    Returns:
        The value.
    """
    for k in path.split("."):
        d = d[k]
    return d


def variant_label(variant: str, size: float | None, sizes: int) -> str:
    """``Word-KD`` (one student size) or ``Word-KD (25%)``; the teacher is ``the teacher``.

    Args:
        variant: the variant name.
        size: the student's size (None: the teacher).
        sizes: how many student sizes the study has.

    Returns:
        The label.
    """
    name = VARIANT_NAMES.get(variant, variant)
    return name if size is None or sizes <= 1 else f"{name} ({size:.0%})"


#: the memorisation warning's rule (:func:`transfer_set_report`): Seq-KD's targets are mostly the gold targets
#: again when more than this share of the teacher's outputs on its transfer rows equal the gold target ...
MEMORISED_SHARE = 0.5
#: ... or when its metric on them is more than this many times its validation metric
MEMORISED_RATIO = 1.5


def transfer_set_report(
    memo: dict, teacher_check: dict | None, teacher_split: float | None
) -> dict:
    """The report's ``transfer_set``: the teacher's metric on its transfer rows (the transfer stage's
    beam outputs against the gold, :func:`lmkd.study.transfer.memorisation`) beside its validation metric
    (the teacher check's greedy score; None when the check was skipped), the share identical to the gold,
    and the one-line warning when Seq-KD's targets are mostly the gold targets (:data:`MEMORISED_SHARE`,
    :data:`MEMORISED_RATIO`).

    Args:
        memo: the memorisation figures.
        teacher_check: the teacher's check (the plan's ``teacher_check``), or None.
        teacher_split: ``--teacher-split``'s fraction, or None.

    Returns:
        ``memo`` with ``validation``, ``ratio``, ``teacher_split`` and ``warning`` (None or the line).
    """
    whole = memo["all"]
    check = teacher_check or {}
    validation = None if check.get("skipped") else check.get("score")
    ratio = whole["score"] / validation if validation and whole["score"] is not None else None
    label = METRIC_LABELS.get(whole["metric"], whole["metric"])
    why = []
    if whole["identical"] is not None and whole["identical"] > MEMORISED_SHARE:
        why.append(f"{whole['identical']:.0%} of its outputs on them are the gold target")
    if ratio is not None and ratio > MEMORISED_RATIO:
        why.append(f"its {label} on them is {ratio:.1f}x its validation {label}")
    warning = None
    if why:
        warning = (
            "**Seq-KD learns mostly the gold targets**: "
            + " and ".join(why)
            + " -- the teacher "
            + ("trained on part of" if teacher_split else "trained on")
            + " the rows the students learn from, so its outputs there are largely the gold targets "
            "again, not its predictions "
            "(--teacher-split F trains it on a share of them only)."
        )
    return {
        **memo,
        "validation": {"metric": whole["metric"], "score": validation, "rows": check.get("rows")},
        "ratio": ratio,
        "teacher_split": teacher_split,
        "warning": warning,
    }


def student_inits(inits: list[dict], rows: list[dict]) -> list[dict]:
    """How each student init was made (its stage's ``init.json`` and ``config.json``): copied teacher layers
    or fresh, the layers, the shape, the share of the teacher's parameters (from the report's rows for an
    init.json that predates it) and whether it is larger than asked.

    Args:
        inits: ``[{"size", "seed", "dir"}]``, one per init stage.
        rows: the report's rows (their parameter shares).

    Returns:
        One dict per init.
    """
    from lmkd.study.student_init import init_shape

    out = []
    for i in inits:
        with open(os.path.join(i["dir"], "init.json")) as f:
            info = json.load(f)
        with open(os.path.join(i["dir"], "config.json")) as f:
            config = json.load(f)
        share = info.get("parameters_vs_teacher")
        if share is None:
            share = next(
                (
                    r["parameters_vs_teacher"]
                    for r in rows
                    if r["size"] == i["size"] and r["seed"] == i["seed"]
                ),
                None,
            )
        out.append(
            {
                "size": i["size"],
                "seed": i["seed"],
                "init": info["init"],
                "layers": info.get("layers"),
                "shape": info.get("shape") or init_shape(config),
                "parameters_vs_teacher": share,
                "larger_than_asked": bool(info.get("larger_than_asked")),
            }
        )
    return out


def no_verdict(groups: list[dict], metric: str, teacher_score: float) -> str | None:
    """The one line that replaces the verdicts when every student (every seed) scored 0 on the headline
    metric: their comparisons are all +0.0 with p = 1 and say nothing.  None otherwise.

    Args:
        groups: the variants.
        metric: the headline metric's label.
        teacher_score: the teacher's score.

    Returns:
        The line, or None.
    """
    students = [g for g in groups if g["variant"] != "teacher"]
    if not students or any(g["score_mean"] != 0 for g in students):
        return None
    return (
        f"**No verdict is possible**: every student scored 0.0 {metric} on the test rows (the teacher "
        f"{teacher_score:.1f}), so every comparison between them is +0.0 with p = 1.000 and says nothing "
        "about distillation -- the students did not learn under this budget (more --student-steps, or a "
        "larger budget)."
    )


def _references(task: str, test_file: str) -> list:
    rows = read_rows(test_file)
    return (
        [r["label"] for r in rows] if task == "classification" else [str(r["target"]) for r in rows]
    )


def _groups(rows: list[dict], keys: list[str]) -> list[dict]:
    """Rows grouped by (size, variant) in model order (:func:`~lmkd.study.verdicts.variant_groups`), with
    mean ± std of every quality column ``keys``."""

    def columns(rs: list[dict]) -> dict:
        return {
            k: dict(zip(("mean", "std"), seed_stats([value_at(r["quality"], k) for r in rs])))
            for k in keys
        }

    return variant_groups(rows, columns, ("ms_per_token", "latency_ms", "steps"))


def build_report(opts: StudyOptions, models: dict, results: dict, speed: dict, data: dict) -> dict:
    """The report: the plan, the data sizes, one row per model (quality, size, output length,
    speed, steps, and each against the teacher), the variants (mean ± std over seeds) and the
    significance tests with their verdict lines, from the eval stages' ``results``, the speed
    stage's ``speed`` and the students' ``train_log.json``.

    Args:
        opts: the resolved options (its plan complete).
        models: ``{name: model entry}`` (the module docstring).
        results: ``{name: quality.json}``.
        speed: ``{name: speed figures}``.
        data: the data stages' paths (``{split}_dir``, ``test``, ``train``, ``transfer_rows``).

    Returns:
        The report (JSON-able; its ``plan`` is :meth:`~lmkd.study.plan.Plan.to_dict`).
    """
    plan = opts.plan
    main, cols = _main_metric(opts.task)
    mode = None if opts.task == "classification" else main.split(".")[0]
    t_params = results["teacher"]["parameters"]
    t_sp = speed["teacher"]
    t_score = value_at(results["teacher"], main)
    info = {}
    for split in ("train", "validation", "test"):
        with open(os.path.join(data[f"{split}_dir"], "info.json")) as f:
            split_info = json.load(f)
        info[f"{split}_rows"] = split_info["rows"]
        if "labels" in split_info:
            info["labels"] = split_info["labels"]
    if "transfer_rows" in data:
        info["transfer_rows"] = len(read_rows(data["transfer_rows"]))
    sizes = len({m["size"] for m in models.values() if m["size"] is not None})
    rows = []
    for name, m in models.items():
        r = results[name]
        sp = speed[name]
        label = variant_label(m["variant"], m["size"], sizes)
        if m["variant"] == "served":  # "Word-KD, served (CTranslate2 int8)"
            src = models[m["source"]]
            label = (
                f"{variant_label(src['variant'], src['size'], sizes)}, served "
                f"({FORMAT_NAMES.get(m['format'], m['format'])})"
            )
        row = {
            "model": name,
            "variant": m["variant"],
            "size": m["size"],
            "seed": m.get("seed"),
            "label": label,
            "path": os.path.abspath(m["dir"]),
            "bytes_on_disk": r.get("bytes_on_disk"),
            "parameters": r["parameters"],
            "parameters_vs_teacher": r["parameters"] / t_params,
            "quality": {k: v for k, v in r.items() if k not in ("parameters", "predictions")},
            "main_metric": main,
            "score": value_at(r, main),
            "score_vs_teacher": (value_at(r, main) / t_score) if t_score else None,
            "latency_ms": sp["latency_ms"],
            "throughput_per_s": sp["throughput_per_s"],
            # per example (batch 1, the study's beam search): counts how long each model's outputs are
            "speedup": t_sp["latency_ms"] / sp["latency_ms"] if sp["latency_ms"] else None,
            "ms_per_token": sp.get("ms_per_token"),
            # per token at a fixed output length: the architecture's speed, the headline speed-up
            "speedup_per_token": (
                t_sp["ms_per_token"] / sp["ms_per_token"]
                if sp.get("ms_per_token") and t_sp.get("ms_per_token")
                else None
            ),
        }
        if mode is not None:
            lengths = output_lengths(load_tokenizer(m["dir"]), r["predictions"][mode])
            row["output_tokens_mean"] = sum(lengths) / len(lengths)
        teacher = m["variant"] == "teacher"
        # a given teacher: how it was trained is not this study's; one trained here: its steps, no curve
        log = None if teacher and opts.teacher is not None else read_train_log(m)
        if m["variant"] == "served":
            row.update(source=m["source"], format=m["format"])
        if log is not None:
            row.update(steps=log["steps"], stopped_early=log["stopped_early"])
        if log is not None and not teacher:
            row.update(
                curve=log["curve"],
                curve_metric=log["metric"],
                curve_greater_is_better=log["greater_is_better"],
            )
        rows.append(row)
    keys = [k for _, k in cols]
    groups = _groups(rows, keys)
    teacher = next(g for g in groups if g["variant"] == "teacher")
    sig = significance(
        opts.task,
        groups,
        teacher,
        {n: results[n]["predictions"] for n in models},
        _references(opts.task, data["test"]),
        mode,
        served_sources(rows),
    )
    # the trivial answers' scores on the test rows, on the headline metric (the teacher check's floors)
    floors = trivial_floors(opts.task, read_rows(data["train"]), read_rows(data["test"]))
    below = below_floor(groups, floors, sig["metrics"][0])
    if below:
        sig["verdicts"].insert(1 if sig["weak_teacher"] else 0, below)
    at_cap = ran_to_the_cap(rows)
    if at_cap:  # after the other warnings, before the comparisons
        sig["verdicts"].insert(bool(sig["weak_teacher"]) + bool(below), at_cap)
    nothing = no_verdict(groups, METRIC_LABELS.get(sig["metrics"][0], sig["metrics"][0]), t_score)
    if nothing:  # the warnings stay; the line replaces one line per comparison
        warnings = sig["verdicts"][: len(sig["verdicts"]) - len(sig["comparisons"])]
        sig["verdicts"], sig["no_verdict"] = warnings + [nothing], nothing
    extra = {}
    if "transfer_dir" in data:
        from lmkd.study.transfer import read_memorisation

        extra["transfer_set"] = transfer_set_report(
            read_memorisation(data["transfer_dir"], opts.task),
            plan.teacher_check,
            opts.teacher_split,
        )
    if data.get("inits"):
        extra["student_inits"] = student_inits(data["inits"], rows)
    per_model = ("latency_ms", "throughput_per_s", "ms_per_token")
    return {
        "task": opts.task,
        "budget": opts.budget,
        "plan": plan.to_dict(),
        "data": {"train": opts.train, "validation": opts.validation, "test": opts.test, **info},
        "teacher": opts.teacher or scratch_teacher(opts),
        **extra,
        "columns": [c for c, _ in cols],
        "column_keys": keys,
        "speed_setup": {k: v for k, v in t_sp.items() if k not in per_model},
        "verdicts": sig["verdicts"],
        "significance": sig,
        "variants": groups,
        "rows": rows,
        "floors": floors,
        "below_floor": below,
        "ran_to_the_cap": at_cap,
    }
