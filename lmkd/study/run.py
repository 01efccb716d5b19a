"""``run_study``: the stages of a whole study in order -- data, teacher, students (the seq2seq or the
classification pipeline), an eval stage per model, one speed stage for all of them, the report."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

from lmkd.core.io import atomic_write_json, file_digest
from lmkd.scoring.timing import busy_warning
from lmkd.study.classification import classification_students, no_mlm_head_note
from lmkd.study.models import evaluate_into, has_mlm_head, measure_models_speed
from lmkd.study.options import StudyOptions, count_stages
from lmkd.study.plan import thread_options
from lmkd.study.report_writer import write_study_report
from lmkd.study.results import build_report
from lmkd.study.seq2seq import seq2seq_students
from lmkd.study.serving import serve_stage
from lmkd.study.splits import prepare_split
from lmkd.study.stages import Job, Stages
from lmkd.study.stopping import read_train_log
from lmkd.study.teachers import teacher_check_of, teacher_stages


def _data_stages(st: Stages, opts: StudyOptions) -> dict[str, str]:
    """The three normalised splits: ``{split: jsonl path, split + "_dir": its stage dir}``."""
    data: dict[str, str] = {}
    labels = None
    for split in ("train", "validation", "test"):
        split_opts = {
            "task": opts.task,
            "columns": [opts.source_column, opts.target_column],
            "file": file_digest(getattr(opts, split)),
            "rows": getattr(opts.plan, f"{split}_rows"),
        }
        d = st.run(
            f"data-{split}",
            split_opts,
            [] if split == "train" else ["data-train"],
            lambda out, split=split, labels=labels: prepare_split(opts, split, out, labels),
            f"reading the {split} data",
        )
        data[split], data[f"{split}_dir"] = os.path.join(d, f"{split}.jsonl"), d
        if split == "train" and opts.task == "classification":
            with open(os.path.join(d, "info.json")) as f:
                labels = json.load(f)["labels"]
    return data


def _read_json(stage_dir: str, name: str) -> dict:
    with open(os.path.join(stage_dir, name)) as f:
        return json.load(f)


def run_study(opts: StudyOptions, after_stage: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) the study described by ``opts``; return the report dict (also written to
    ``OUTPUT/report.json``).

    ``after_stage(name)`` is called after every stage that ran, once it is saved (see
    :class:`~lmkd.study.stages.Stages`); raising :class:`~lmkd.study.stages.StudyStopped` from it
    stops the study there, as an interruption would.

    Args:
        opts: the study's options (resolved here).
        after_stage: called with each stage's name after it ran.

    Returns:
        The report.
    """
    opts.resolve()
    if opts.task == "causal-lm":
        from lmkd.study.causal_lm_study import run_causal_study

        return run_causal_study(opts, after_stage)
    plan = opts.plan
    # a given classification teacher may be a bare encoder: no MLM to distil from (checked before any stage)
    mlm_head = opts.task != "classification" or opts.teacher is None or has_mlm_head(opts.teacher)
    if not mlm_head:
        plan.note(no_mlm_head_note(opts.teacher))
    os.makedirs(opts.output, exist_ok=True)
    st = Stages(opts.output, count_stages(opts, mlm_head), after_stage=after_stage)
    print(f"lmkd study: {opts.task}, budget {opts.budget}, output {opts.output}", flush=True)

    data = _data_stages(st, opts)
    test_file = data["test"]
    teachers = teacher_stages(st, opts, data)
    # what the report says of the teacher: its check (stage dir of a trained one, or the check stage)
    plan.teacher_check = teacher_check_of(teachers["teacher"], st.path("teacher-check"))
    models: dict[str, dict] = {
        "teacher": {
            "dir": teachers["teacher"],
            "stage": "teacher",
            "variant": "teacher",
            "size": None,
            "seed": None,
        }
    }
    if opts.task == "classification":
        students, jobs = classification_students(st, opts, teachers, data, mlm_head)
    else:
        students, jobs = seq2seq_students(st, opts, data, teachers["teacher"])
    models.update(students)

    eval_opts = {
        "beams": plan.beams,
        "max_new_tokens": plan.max_new_tokens,
        "evaluate": "evaluate_models",
        **thread_options(plan),
    }

    def eval_jobs(names) -> list[Job]:
        # cheapest: a worker takes one when no training is ready (the teacher's while the last students train)
        return [
            Job(
                f"eval-{name}",
                eval_opts,
                [models[name]["stage"], "data-test"],
                evaluate_into,
                dict(
                    model_dir=models[name]["dir"],
                    task=opts.task,
                    test_file=test_file,
                    beams=plan.beams,
                    max_new_tokens=plan.max_new_tokens,
                ),
                f"evaluating {name} on the test set",
                cost=0.5,
            )
            for name in names
        ]

    # one job graph: the students (and what they wait for) and every evaluation, each as soon as its model is
    dirs = st.run_jobs(jobs + eval_jobs(list(models)), plan.workers)
    # the best student by validation CE, exported as it would be served: one more model from here on
    served = serve_stage(st, opts, models, read_train_log)
    models.update(served)
    dirs.update(st.run_jobs(eval_jobs(list(served)), plan.workers))
    results = {name: _read_json(dirs[f"eval-{name}"], "quality.json") for name in models}

    # "fixed_new_tokens": the per-token speed (every model forced to decode that many tokens) is measured too
    speed_opts = {
        "beams": plan.beams,
        "max_new_tokens": plan.max_new_tokens,
        "examples": plan.speed_examples,
        "repeats": plan.speed_repeats,
        "fixed_new_tokens": plan.max_new_tokens,
    }

    def speed_fn(out):
        atomic_write_json(
            os.path.join(out, "speed.json"),
            measure_models_speed(
                {n: m["dir"] for n, m in models.items()},
                opts.task,
                test_file,
                plan.beams,
                plan.max_new_tokens,
                plan.speed_examples,
                plan.speed_repeats,
            ),
        )

    # alone: nothing else may run while the models are timed
    sd = st.run(
        "speed",
        speed_opts,
        [m["stage"] for m in models.values()] + ["data-test"],
        speed_fn,
        f"measuring the speed of {len(models)} models side by side",
    )
    report = build_report(opts, models, results, _read_json(sd, "speed.json"), data)
    # v2: verdict lines, significance, per-token speed, seeds; v4: the weak-teacher warning (older
    # reports are rewritten); v5: the from-scratch teacher's architecture, the workers; v6: the served
    # model's row, bytes on disk; v7: its label; v8: the students below the trivial floor; v9, v10: the
    # Word-KD teacher note (cached or online); v11: the timing-noise note; v12: verdicts that must survive
    # the seeds' spread, the memorisation figures and inits, the served model by its validation metric;
    # v13: the warning when every student ran to the step cap;
    # v14: the teacher's steps and whether it ran to its cap; verdicts need an interval excluding zero
    st.publish_report(
        14,
        [f"eval-{n}" for n in models] + ["speed"],
        lambda out: write_study_report(report, out),
        opts.output,
    )
    if busy_warning(report["speed_setup"]):
        print(
            f"lmkd study: warning: other processes used {report['speed_setup']['other_cpu_load']:.0%} of the cores "
            "while the models were timed: the speed columns are not reliable (see the report's notes)",
            file=sys.stderr,
            flush=True,
        )
    if report["significance"].get("weak_teacher"):
        print(
            "lmkd study: warning: a student trained without the teacher beats it -- a weak teacher (see the "
            "report's first verdict)",
            file=sys.stderr,
            flush=True,
        )
    return report
