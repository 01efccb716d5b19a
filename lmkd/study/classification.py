"""The classification study -- the DistilBERT path against plain fine-tuning, per student size:

    student init (every other teacher-MLM layer, or ``fraction`` of them evenly spaced)
    -> student MLM-distilled from the teacher MLM -> fine-tuned on the labels   (distilbert)
    -> the same init fine-tuned on the labels without KD                        (no-kd)
"""

from __future__ import annotations

import os
import shutil

from .models import classifier_from, save_model, train_student
from .plan import StudyOptions, size_name
from .stages import Stages


def classification_students(st: Stages, opts: StudyOptions, teachers: dict, data: dict) -> dict[str, dict]:
    """Both variants of every student size; returns ``{stage name: {"dir", "stage", "variant", "size"}}``."""
    students: dict[str, dict] = {}
    for fraction in opts.student_sizes:
        students.update(_students_of_size(st, opts, teachers, data, fraction))
    return students


def _students_of_size(st: Stages, opts: StudyOptions, teachers: dict, data: dict, fraction: float) -> dict[str, dict]:
    """DistilBERT path (MLM-distil a layer-copied student, then fine-tune) vs plain fine-tuning of the
    same init, for one student size (``fraction`` of the teacher's layers, evenly spaced)."""
    plan = opts.plan
    size = size_name(fraction)
    mlm_dir = teachers["teacher-mlm"]
    train_file, val_file = data["train"], data["validation"]

    def init_fn(out):
        from ..modeling import load_model, load_tokenizer
        from ..student import every_other, make_student, spread_layers

        teacher = load_model(mlm_dir, kind="mlm")
        n = teacher.config.num_hidden_layers
        keep = max(1, round(n * fraction))
        layers = every_other(n) if keep == len(every_other(n)) else spread_layers(n, keep)
        save_model(make_student(teacher, layers=layers), load_tokenizer(mlm_dir), out)

    init_dir = st.run(f"{size}-init", {"fraction": fraction}, ["teacher-mlm"], init_fn,
                      f"a student of {fraction:g} of the teacher's layers (copied, DistilBERT-style)")
    common = {"lr": plan["student_lr"], "batch": plan["batch_size"], "warmup": plan["warmup_steps"],
              "max_length": plan["max_length"], "seed": opts.seed}

    def mlm_fn(out):
        train_student(out, init_dir, "mlm", train_file, val_file, plan, steps=plan["student_steps"],
                      lr=plan["student_lr"], teacher_dir=mlm_dir, kd_alpha=plan["kd_alpha"], seed=opts.seed)

    mlm_opts = {**common, "steps": plan["student_steps"], "kd_alpha": plan["kd_alpha"],
                "kd_temperature": plan["kd_temperature"]}
    distil_dir = st.run(f"{size}-mlm-distil", mlm_opts, [f"{size}-init", "teacher-mlm", "data-train",
                                                         "data-validation"], mlm_fn,
                        f"MLM-distilling the student from the teacher (alpha {plan['kd_alpha']})")
    out_models = {}
    for variant, start, dep in (("distilbert", distil_dir, f"{size}-mlm-distil"), ("no-kd", init_dir, f"{size}-init")):
        def fn(out, start=start):
            init = os.path.join(out, "init")
            classifier_from(start, data["train_dir"], init)
            train_student(out, init, "classification", train_file, val_file, plan, steps=plan["student_steps"],
                          lr=plan["student_lr"], seed=opts.seed)
            shutil.rmtree(init)

        name = f"{size}-{variant}"
        d = st.run(name, {**common, "steps": plan["student_steps"]}, [dep, "data-train", "data-validation"], fn,
                   f"fine-tuning the {variant} student on the labels")
        out_models[name] = {"dir": d, "stage": name, "variant": variant, "size": fraction}
    return out_models
