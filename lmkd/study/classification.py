"""The classification study -- four students per size and seed, from one layer-copied init:

    student init (every other teacher layer, or ``fraction`` of them evenly spaced)
    -> fine-tuned on the labels alone                                            (no-kd)
    -> fine-tuned with task KD from the fine-tuned teacher's class logits         (task-kd; Hinton)
    -> MLM-distilled from the teacher MLM -> fine-tuned on the labels             (distilbert)
    -> MLM-distilled from the teacher MLM -> fine-tuned with task KD              (distilbert+task-kd)

A teacher without masked-LM head weights (e.g. a ``BertModel`` / sentence-transformers encoder) has
no MLM to distil from: the MLM-distil variants are skipped and a note says so (``plan.notes``).
Every fine-tuning and every MLM distillation stops on its validation plateau
(:class:`~lmkd.study.stopping.StoppingRule`), ``student_steps`` being the cap.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any

from lmkd.study.models import classifier_from, save_model, train_student
from lmkd.study.options import StudyOptions, seeded, student_seeds
from lmkd.study.plan import (
    MLM_VARIANTS,
    Plan,
    classification_variants,
    plan_view,
    size_name,
    thread_options,
)
from lmkd.study.stages import Job, Stages
from lmkd.study.stopping import TRAIN_LOG, StoppingRule


def no_mlm_head_note(teacher: str) -> str:
    """The report note of a teacher without MLM head weights.

    Args:
        teacher: the given teacher's path.

    Returns:
        The note.
    """
    return (
        f"The teacher {teacher} has no masked-LM head weights (an encoder without an MLM head): it was "
        f"fine-tuned as the teacher classifier, and the MLM-distil variants ({', '.join(MLM_VARIANTS)}) were "
        "skipped -- distilling through a randomly initialised MLM head would teach the student nothing."
    )


def classification_students(
    st: Stages, opts: StudyOptions, teachers: dict, data: dict, mlm_head: bool = True
) -> tuple[dict[str, dict], list[Job]]:
    """The init of every student size, then the jobs of every variant of every size and seed, for the
    caller to run with its other jobs; returns the students as ``{stage name: {"dir", "stage",
    "variant", "size", "seed", "train_log"}}`` and the jobs.  ``mlm_head``: whether
    ``teachers["teacher-mlm"]`` has MLM head weights (:func:`~lmkd.study.models.has_mlm_head`);
    without, only the variants that need none run.

    Args:
        st: the study's stages.
        opts: the resolved options.
        teachers: ``{"teacher": dir, "teacher-mlm": dir}`` (:func:`~lmkd.study.teachers.teacher_stages`).
        data: the data stages' paths.
        mlm_head: whether the MLM teacher has MLM head weights.

    Returns:
        ``(students, jobs)``.
    """
    students: dict[str, dict] = {}
    jobs: list[Job] = []
    for fraction in opts.student_sizes:
        size_students, size_jobs = _students_of_size(st, opts, teachers, data, fraction, mlm_head)
        students.update(size_students)
        jobs += size_jobs
    return students, jobs


def _students_of_size(
    st: Stages, opts: StudyOptions, teachers: dict, data: dict, fraction: float, mlm_head: bool
) -> tuple[dict[str, dict], list[Job]]:
    """The variants of one student size (``fraction`` of the teacher's layers, evenly spaced), all
    from the same layer-copied init."""
    plan = opts.plan
    size = size_name(fraction)
    mlm_dir, teacher_dir = teachers["teacher-mlm"], teachers["teacher"]
    train_file, val_file = data["train"], data["validation"]
    stopping = StoppingRule.from_plan(plan, "classification")
    mlm_stopping = StoppingRule.from_plan(
        plan, "mlm"
    )  # MLM distillation has no task metric: the gold CE

    def init_fn(out):
        from lmkd.models.loading import load_model, load_tokenizer
        from lmkd.models.student import every_other, make_student, spread_layers

        if mlm_head:
            teacher = load_model(mlm_dir, kind="mlm")
        else:  # the bare encoder: the student copies its layers and gets a fresh classifier head later
            from transformers import AutoModel

            teacher = AutoModel.from_pretrained(mlm_dir)
        n = teacher.config.num_hidden_layers
        keep = max(1, round(n * fraction))
        layers = every_other(n) if keep == len(every_other(n)) else spread_layers(n, keep)
        save_model(make_student(teacher, layers=layers), load_tokenizer(mlm_dir), out)

    init_opts = (
        {"fraction": fraction} if mlm_head else {"fraction": fraction, "encoder": "no MLM head"}
    )
    init_dir = st.run(
        f"{size}-init",
        init_opts,
        ["teacher-mlm"],
        init_fn,
        f"a student of {fraction:g} of the teacher's layers (copied, DistilBERT-style)",
    )
    kd = {"kd_alpha": plan.kd_alpha, "kd_temperature": plan.kd_temperature}
    out_models: dict[str, dict] = {}
    jobs: list[Job] = []
    for seed in student_seeds(opts):
        common = {
            "lr": plan.finetune_lr,
            "mlm_lr": plan.student_lr,
            "batch": plan.batch_size,
            "warmup": plan.warmup_steps,
            "max_length": plan.max_length,
            "seed": seed,
            "steps": plan.student_steps,
            "stopping": stopping.options(),
            **thread_options(plan),
        }
        starts = {"init": (init_dir, f"{size}-init")}
        if mlm_head:
            distil = seeded(f"{size}-mlm-distil", opts, seed)
            jobs.append(
                Job(
                    distil,
                    {**common, **kd, "stopping": mlm_stopping.options()},
                    [f"{size}-init", "teacher-mlm", "data-train", "data-validation"],
                    train_student,
                    dict(
                        init_dir=init_dir,
                        task="mlm",
                        train_file=train_file,
                        validation_file=val_file,
                        plan=plan,
                        steps=plan.student_steps,
                        lr=plan.student_lr,
                        teacher_dir=mlm_dir,
                        kd_alpha=plan.kd_alpha,
                        seed=seed,
                        stopping=mlm_stopping.options(),
                    ),
                    f"MLM-distilling the student from the teacher (alpha {plan.kd_alpha}, "
                    f"seed {seed})",
                    cost=3.0,
                )
            )  # the variants that start from it wait for it: first
            starts["mlm-distil"] = (st.path(distil), distil)
        for variant in classification_variants(mlm_head):
            start, dep = starts["mlm-distil" if variant in MLM_VARIANTS else "init"]
            task_kd = variant.endswith("task-kd")
            name = seeded(f"{size}-{variant}", opts, seed)
            deps = [dep, "data-train", "data-validation"] + (["teacher"] if task_kd else [])
            what = f"fine-tuning the {variant} student on the labels (seed {seed})" + (
                f" with KD from the teacher's class logits (alpha {plan.kd_alpha}, "
                f"temperature {plan.kd_temperature})"
                if task_kd
                else ""
            )
            jobs.append(
                Job(
                    name,
                    {**common, **(kd if task_kd else {})},
                    deps,
                    train_classifier,
                    dict(
                        start=start,
                        data_dir=data["train_dir"],
                        train_file=train_file,
                        val_file=val_file,
                        plan=plan,
                        seed=seed,
                        stopping=stopping.options(),
                        teacher_dir=teacher_dir if task_kd else None,
                        kd_alpha=plan.kd_alpha if task_kd else 0.0,
                    ),
                    what,
                    cost=2.0 if task_kd else 1.0,
                )
            )
            out_models[name] = {
                "stage": name,
                "variant": variant,
                "size": fraction,
                "seed": seed,
                "dir": st.path(name),
                "train_log": os.path.join(st.path(name), TRAIN_LOG),
            }
    return out_models, jobs


def train_classifier(
    out: str,
    start: str,
    data_dir: str,
    train_file: str,
    val_file: str,
    plan: Plan | Mapping[str, Any],
    seed: int,
    stopping: dict,
    teacher_dir: str | None = None,
    kd_alpha: float = 0.0,
) -> None:
    """A classification student stage: the encoder ``start`` with a fresh classifier head (seeded),
    fine-tuned on the labels -- with task KD from ``teacher_dir``'s class logits when ``kd_alpha`` > 0 --
    until its validation plateau; the model is saved into ``out``.

    Args:
        out: the stage's directory.
        start: the encoder it starts from (the init, or the MLM-distilled student).
        data_dir: the training split's stage (its ``info.json`` names the labels).
        train_file: the training rows.
        val_file: the validation rows.
        plan: the study's plan (or a mapping of its keys, :func:`~lmkd.study.plan.plan_view`).
        seed: the seed of the head and of the training.
        stopping: the :meth:`~lmkd.study.stopping.StoppingRule.options` it stops by.
        teacher_dir: the teacher classifier of task KD.
        kd_alpha: the weight of task KD (0: the labels alone).
    """
    view = plan_view(plan)
    init = os.path.join(out, "init")
    classifier_from(start, data_dir, init, seed=seed)
    train_student(
        out,
        init,
        "classification",
        train_file,
        val_file,
        plan,
        steps=view.student_steps,
        lr=view.finetune_lr,
        seed=seed,
        stopping=stopping,
        teacher_dir=teacher_dir,
        kd_alpha=kd_alpha,
    )
    shutil.rmtree(init)
