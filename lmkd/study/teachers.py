"""The study's teacher stages: a given teacher (hashed by content), or a tokenizer and a teacher
trained from scratch -- a BART-style seq2seq model, or for classification a BERT-style masked LM
that is then fine-tuned as the classifier teacher."""

from __future__ import annotations

import os
import shutil

from ..io import file_digest, read_rows
from .models import classifier_from, save_model, train_student
from .plan import StudyOptions
from .stages import Stages


def teacher_stages(st: Stages, opts: StudyOptions, data: dict) -> dict[str, str]:
    """Stages that produce the teacher; returns {"teacher": dir, "teacher-mlm": dir (classification)}."""
    plan = opts.plan
    cls = opts.task == "classification"
    if opts.teacher is not None:
        from ..modeling import load_tokenizer

        load_tokenizer(opts.teacher)  # a teacher without a tokenizer is a user mistake: say so now
        given = {"path": os.path.abspath(opts.teacher), "digest": file_digest(opts.teacher)}
        if not cls:
            st.run("teacher", given, [], lambda out: None, "using the given teacher")
            return {"teacher": opts.teacher}
        st.run("teacher-mlm", given, [], lambda out: None, "using the given teacher as the MLM encoder")
        mlm_dir = opts.teacher
    else:
        from ..scratch import train_tokenizer

        def tokenizer_fn(out):
            rows = read_rows(data["train"])
            texts = [r["text"] for r in rows] if cls else [r["source"] for r in rows] + [r["target"] for r in rows]
            train_tokenizer(texts, vocab_size=plan["vocab_size"]).save_pretrained(out)

        tok_dir = st.run("tokenizer", {"vocab_size": plan["vocab_size"]}, ["data-train"], tokenizer_fn,
                         f"training a {plan['vocab_size']}-token unigram tokenizer")
        arch = "bert" if cls else "bart"
        shape = plan["teacher"]
        teacher_opts = {"arch": arch, "shape": shape, "steps": plan["teacher_mlm_steps" if cls else "teacher_steps"],
                        "lr": plan["teacher_lr"], "batch": plan["batch_size"], "warmup": plan["warmup_steps"],
                        "max_length": plan["max_length"], "seed": opts.seed, "dropout": plan["dropout"]}

        def teacher_fn(out, kind=None):
            from ..modeling import load_tokenizer
            from ..scratch import build_model

            tok = load_tokenizer(tok_dir)
            init = os.path.join(out, "init")
            model = build_model(arch, len(tok), seed=opts.seed, max_positions=max(256, plan["max_length"] + 2),
                                dropout=plan["dropout"], **shape)
            save_model(model, tok, init)
            task = "mlm" if cls else opts.task
            train_student(out, init, task, data["train"], data["validation"], plan, steps=teacher_opts["steps"],
                          lr=plan["teacher_lr"], seed=opts.seed)
            shutil.rmtree(init)

        name = "teacher-mlm" if cls else "teacher"
        n = f"{shape['d_model']}-wide, {shape['layers']}{'' if cls else '+' + str(shape['layers'])} layers"
        what = (f"pre-training a BERT-style masked-LM teacher ({n}) for {teacher_opts['steps']} steps" if cls else
                f"training a BART-style teacher ({n}) for {teacher_opts['steps']} steps")
        mlm_dir = st.run(name, teacher_opts, ["tokenizer", "data-train", "data-validation"], teacher_fn, what)
        if not cls:
            return {"teacher": mlm_dir}

    def teacher_cls_fn(out):
        init = os.path.join(out, "init")
        classifier_from(mlm_dir, data["train_dir"], init)
        train_student(out, init, "classification", data["train"], data["validation"], plan,
                      steps=plan["teacher_steps"], lr=plan["teacher_lr"], seed=opts.seed)
        shutil.rmtree(init)

    cls_opts = {"steps": plan["teacher_steps"], "lr": plan["teacher_lr"], "batch": plan["batch_size"],
                "warmup": plan["warmup_steps"], "max_length": plan["max_length"], "seed": opts.seed}
    teacher_dir = st.run("teacher", cls_opts, ["teacher-mlm", "data-train", "data-validation"], teacher_cls_fn,
                         f"fine-tuning the teacher classifier for {plan['teacher_steps']} steps")
    return {"teacher": teacher_dir, "teacher-mlm": mlm_dir}
