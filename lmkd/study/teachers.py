"""The study's teacher stages: a given teacher (hashed by content), or a tokenizer and a teacher
trained from scratch -- a pre-LN BART-style (mBART) seq2seq model, or for classification a BERT-style masked LM
that is then fine-tuned as the classifier teacher.  Every teacher passes the check of
:mod:`lmkd.study.checks` before any student is trained: a from-scratch teacher that fails it
trains one more round at half the learning rate, then the study stops (no report)."""

from __future__ import annotations

import json
import os
import shutil

from lmkd.core.io import atomic_write_json, file_digest, read_rows
from lmkd.study.checks import TeacherDidNotLearn, check_teacher, ignores_source, summary
from lmkd.study.lengths import describe, size_lengths
from lmkd.study.models import classifier_from, save_model, train_student
from lmkd.study.options import StudyOptions
from lmkd.study.plan import SEQ2SEQ_TEACHER_ARCH, Plan
from lmkd.study.stages import Stages
from lmkd.study.stopping import StoppingRule, read_train_log


def teacher_stages(st: Stages, opts: StudyOptions, data: dict) -> dict[str, str]:
    """Stages that produce the teacher; returns {"teacher": dir, "teacher-mlm": dir (classification)}.

    Args:
        st: the study's stages.
        opts: the resolved options (the length stage sets the plan's lengths).
        data: the data stages' paths.

    Returns:
        ``{"teacher": dir}``, and ``"teacher-mlm"`` for classification.
    """
    plan = opts.plan
    cls = opts.task == "classification"
    if opts.teacher is not None:
        from lmkd.models.loading import load_tokenizer

        load_tokenizer(opts.teacher)  # a teacher without a tokenizer is a user mistake: say so now
        given = {"path": os.path.abspath(opts.teacher), "digest": file_digest(opts.teacher)}
        if not cls:
            st.run("teacher", given, [], lambda out: None, "using the given teacher")
            _length_stage(st, opts, data, opts.teacher, "teacher")
            _check_stage(st, opts, data, opts.teacher, opts.task, ["teacher"])
            return {"teacher": opts.teacher}
        st.run(
            "teacher-mlm", given, [], lambda out: None, "using the given teacher as the MLM encoder"
        )
        _length_stage(st, opts, data, opts.teacher, "teacher-mlm")
        mlm_dir = opts.teacher
    else:
        from lmkd.models.scratch import train_tokenizer

        def tokenizer_fn(out):
            rows = read_rows(data["train"])
            texts = (
                [r["text"] for r in rows]
                if cls
                else [r["source"] for r in rows] + [r["target"] for r in rows]
            )
            train_tokenizer(texts, vocab_size=plan.vocab_size).save_pretrained(out)

        tok_dir = st.run(
            "tokenizer",
            {"vocab_size": plan.vocab_size},
            ["data-train"],
            tokenizer_fn,
            f"training a {plan.vocab_size}-token BPE tokenizer",
        )
        _length_stage(st, opts, data, tok_dir, "tokenizer")
        arch = "bert" if cls else SEQ2SEQ_TEACHER_ARCH
        shape = plan.teacher
        steps = plan.teacher_mlm_steps if cls else plan.teacher_steps
        teacher_opts = {
            "arch": arch,
            "shape": shape,
            "steps": steps,
            "lr": plan.teacher_lr,
            "batch": plan.batch_size,
            "warmup": plan.warmup_steps,
            "max_length": plan.max_length,
            "positions": plan.positions,
            "seed": opts.seed,
            "dropout": plan.dropout,
        }
        rule = teacher_rule(opts)
        if not cls and rule is not None:  # trained like the students: to its plateau
            teacher_opts["stopping"] = rule.options()

        def teacher_fn(out, kind=None):
            from lmkd.models.loading import load_tokenizer
            from lmkd.models.scratch import build_model

            tok = load_tokenizer(tok_dir)
            init = os.path.join(out, "init")
            model = build_model(
                arch,
                len(tok),
                seed=opts.seed,
                max_positions=plan.positions,
                dropout=plan.dropout,
                **shape,
            )
            save_model(model, tok, init)
            if cls:  # the masked LM is checked as the classifier it becomes (teacher_cls_fn)
                train_student(
                    out,
                    init,
                    "mlm",
                    data["train"],
                    data["validation"],
                    plan,
                    steps=teacher_opts["steps"],
                    lr=plan.teacher_lr,
                    seed=opts.seed,
                )
            else:
                train_checked(out, init, opts, data, teacher_opts["steps"], plan.teacher_lr)
            shutil.rmtree(init)

        name = "teacher-mlm" if cls else "teacher"
        deps = ["tokenizer", "data-train", "data-validation"]
        if (
            opts.teacher_split is not None
        ):  # the teacher's rows only; the students learn from all of them
            teacher_opts["split"] = opts.teacher_split
            deps.append(_teacher_rows_stage(st, opts, data))
        n = f"{shape['d_model']}-wide, {shape['layers']}{'' if cls else '+' + str(shape['layers'])} layers"
        what = (
            f"pre-training a BERT-style masked-LM teacher ({n}) for {teacher_opts['steps']} steps"
            if cls
            else f"training a pre-LN BART-style (mBART) teacher ({n}) "
            + _how_long(opts, teacher_opts["steps"])
        )
        if not cls:
            teacher_opts["check"] = _check_options(opts)
        if opts.teacher_split is not None:
            what += f" on {opts.teacher_split:g} of the training rows (--teacher-split)"
        mlm_dir = st.run(name, teacher_opts, deps, teacher_fn, what)
        if not cls:
            return {"teacher": mlm_dir}

    def teacher_cls_fn(out):
        init = os.path.join(out, "init")
        classifier_from(mlm_dir, data["train_dir"], init, seed=opts.seed)
        train_checked(out, init, opts, data, plan.teacher_steps, plan.finetune_lr)
        shutil.rmtree(init)

    cls_opts = {
        "steps": plan.teacher_steps,
        "lr": plan.finetune_lr,
        "batch": plan.batch_size,
        "warmup": plan.warmup_steps,
        "max_length": plan.max_length,
        "seed": opts.seed,
        "check": _check_options(opts),
    }
    rule = teacher_rule(opts)
    if rule is not None:  # the fine-tuning stops on its validation plateau
        cls_opts["stopping"] = rule.options()
    teacher_dir = st.run(
        "teacher",
        cls_opts,
        ["teacher-mlm", "data-train", "data-validation"],
        teacher_cls_fn,
        "fine-tuning the teacher classifier " + _how_long(opts, plan.teacher_steps),
    )
    return {"teacher": teacher_dir, "teacher-mlm": mlm_dir}


def teacher_rule(opts: StudyOptions) -> StoppingRule | None:
    """How a teacher trained here stops: the students' rule with the teacher's cap
    (:meth:`StoppingRule.for_teacher`), or None with ``--fixed-teacher-steps``.

    Args:
        opts: the resolved options.

    Returns:
        The rule, or None.
    """
    return None if opts.fixed_teacher_steps else StoppingRule.for_teacher(opts.plan, opts.task)


def _how_long(opts: StudyOptions, steps: int) -> str:
    if opts.fixed_teacher_steps:
        return f"for {steps} steps (--fixed-teacher-steps)"
    return f"until its validation metric levels off (at most {steps} steps)"


def _teacher_rows_stage(st: Stages, opts: StudyOptions, data: dict) -> str:
    """``--teacher-split``: the stage choosing the teacher's rows
    (:func:`~lmkd.study.splits.split_teacher_rows`); sets ``data["teacher_train"]`` (the rows the teacher
    trains on) and ``data["teacher_rows_dir"]``; returns
    the stage's name."""
    from lmkd.study.splits import TEACHER_ROWS, split_teacher_rows

    d = st.run(
        "teacher-rows",
        {"fraction": opts.teacher_split, "seed": opts.seed},
        ["data-train"],
        lambda out: split_teacher_rows(data["train"], opts.teacher_split, opts.seed, out),
        f"choosing the teacher's {opts.teacher_split:g} of the training rows (--teacher-split)",
    )
    data["teacher_train"], data["teacher_rows_dir"] = os.path.join(d, TEACHER_ROWS), d
    return "teacher-rows"


# ---- the teacher check ----------------------------------------------------------------------------


def _check_options(opts: StudyOptions) -> dict:
    return {"on": opts.teacher_check, "rows": opts.plan.check_rows, "v": 1}


def run_check(opts: StudyOptions, data: dict, model_dir: str, task: str) -> dict:
    """The teacher check (:func:`lmkd.study.checks.check_teacher`) of ``model_dir`` with the study's
    rows and plan.

    Args:
        opts: the resolved options.
        data: the data stages' paths.
        model_dir: the teacher.
        task: the study task.

    Returns:
        The check's figures (``passed``, ``reasons``, ``score``, ``floor``, ...).
    """
    plan = opts.plan
    return check_teacher(
        model_dir,
        task,
        read_rows(data["train"]),
        read_rows(data["validation"]),
        rows=plan.check_rows,
        max_new_tokens=plan.max_new_tokens,
        max_source_length=plan.max_length,
        max_target_length=plan.max_length,
        seed=opts.seed,
    )


def _refuse(check: dict, given: bool) -> None:
    advice = (
        "give a teacher that has learned this task"
        if given
        else "train it longer (--teacher-steps), on more rows, or give a trained --teacher"
    )
    raise TeacherDidNotLearn(
        f"the teacher did not learn: {'; '.join(check['reasons'])}; no student is compared "
        f"with it and no report is written -- {advice} (or pass --skip-teacher-check to "
        "study an unchecked teacher)"
    )


def train_checked(
    out: str, init: str, opts: StudyOptions, data: dict, steps: int, lr: float
) -> None:
    """Train the from-scratch teacher ``init`` into ``out`` at ``lr`` and check it; when it fails, one more
    round of ``steps``, then check again: a teacher that learned something but too little continues
    from where it stopped at half the learning rate; one that collapsed (:func:`collapsed`: it ignores
    the source, or does no better than the trivial answer) starts again from ``init`` at a third of it --
    more steps do not revive a collapsed model.  Writes ``teacher_check.json`` (every round's figures)
    into ``out``; raises :class:`TeacherDidNotLearn`.

    Args:
        out: the stage's directory.
        init: the saved, untrained teacher.
        opts: the resolved options.
        data: the data stages' paths.
        steps: the steps of each round.
        lr: the first round's learning rate.
    """
    plan, task = opts.plan, opts.task
    rounds: list[dict] = []
    start = init
    for r in (1, 2):
        dest = os.path.join(out, f"round-{r}")
        # (--teacher-split: the teacher's share of the training rows, teacher_rows_stage)
        train_student(
            dest,
            start,
            task,
            data.get("teacher_train", data["train"]),
            data["validation"],
            plan,
            steps=steps,
            lr=lr,
            seed=opts.seed,
            stopping=teacher_rule(opts),
        )
        log = read_train_log({"dir": dest}) or {}
        check = (
            run_check(opts, data, dest, task)
            if opts.teacher_check
            else {"passed": True, "skipped": True}
        )
        rounds.append(
            {
                "round": r,
                "steps": steps,
                "trained_steps": log.get("steps"),
                "stopped_early": log.get("stopped_early"),
                "best_step": log.get("best_step"),
                "lr": lr,
                "from": "init" if start == init else f"round {r - 1}",
                **check,
            }
        )
        print(
            f"  teacher check, round {r}: "
            + ("skipped (--skip-teacher-check)" if check.get("skipped") else summary(check)),
            flush=True,
        )
        if check["passed"] or r == 2:
            break
        start, lr = (init, lr / 3) if collapsed(check) else (dest, lr / 2)
    final = rounds[-1]
    if not final["passed"]:
        _refuse(final, given=False)
    for name in os.listdir(dest):  # the checked round becomes the stage's model
        shutil.move(os.path.join(dest, name), os.path.join(out, name))
    for r in range(1, len(rounds) + 1):
        shutil.rmtree(os.path.join(out, f"round-{r}"), ignore_errors=True)
    atomic_write_json(os.path.join(out, "teacher_check.json"), {"rounds": rounds, **final})


def collapsed(check: dict) -> bool:
    """Whether a failed teacher check shows a collapsed model rather than an under-trained one: it
    ignores the source (seq2seq), or scores no better than the best trivial answer.  Measured on
    the shipped French descriptions: a from-scratch BART's encoder output had become one constant
    vector (std 0.0005 across inputs) -- cross-entropy 4.15 with the real sources and with shuffled ones.

    Args:
        check: a failed check's figures.

    Returns:
        Whether the model collapsed.
    """
    return ignores_source(check) or check["score"] <= check["floor"]


def _check_stage(
    st: Stages, opts: StudyOptions, data: dict, model_dir: str, task: str, deps: list[str]
) -> None:
    """The check of a given (not trained here) teacher as a stage of its own; raises when it fails."""

    def fn(out):
        check = (
            run_check(opts, data, model_dir, task)
            if opts.teacher_check
            else {"passed": True, "skipped": True}
        )
        if not check["passed"]:
            _refuse(check, given=True)
        atomic_write_json(os.path.join(out, "teacher_check.json"), {"rounds": [], **check})

    st.run(
        "teacher-check",
        _check_options(opts),
        deps + ["data-train", "data-validation"],
        fn,
        "checking that the given teacher has learned the task",
    )


def teacher_check_of(teacher_dir: str, stage_dir: str | None = None) -> dict | None:
    """The saved check of a study's teacher (``teacher_check.json`` in its stage dir), or None.

    Args:
        teacher_dir: the teacher's stage dir.
        stage_dir: the teacher-check stage's dir (a given teacher's).

    Returns:
        The check, or None.
    """
    for d in (teacher_dir, stage_dir):
        path = os.path.join(d, "teacher_check.json") if d else None
        if path and os.path.isfile(path):
            with open(path) as f:
                return json.load(f)
    return None


def _length_stage(st: Stages, opts: StudyOptions, data: dict, tokenizer_dir: str, dep: str) -> None:
    """Size the study's max length and position tables from the training data (:mod:`lmkd.study.lengths`)
    and put them into the plan: ``max_length``, ``positions`` and the record ``length_sizing``."""
    plan = opts.plan
    cap = plan.length_cap()
    cls = opts.task == "classification"

    def fn(out):
        from lmkd.models.loading import load_tokenizer
        from lmkd.models.truncation import input_limit

        # a given teacher: what its position table takes is a hard limit (the one truncation rule)
        limit = input_limit(tokenizer_dir) if dep != "tokenizer" else None
        sizing = size_lengths(
            load_tokenizer(tokenizer_dir),
            read_rows(data["train"]),
            ("text", None) if cls else ("source", "target"),
            cap,
            plan.max_new_tokens,
            limit,
        )
        atomic_write_json(os.path.join(out, "lengths.json"), sizing)

    d = st.run(
        "lengths",
        {"cap": cap, "max_new_tokens": plan.max_new_tokens, "v": 1},
        [dep, "data-train"],
        fn,
        "sizing the maximum length and position tables from the training data",
    )
    with open(os.path.join(d, "lengths.json")) as f:
        sizing = json.load(f)
    print(f"  {describe(sizing)}", flush=True)
    plan.apply_lengths(sizing)


def fit_batch(plan: Plan | dict) -> None:
    """Fit a plan's batch size to its ``batch_tokens`` budget (:meth:`~lmkd.study.plan.Plan.fit_batch`),
    also for a plan held as a dict of its keys (a benchmark's, report.json's), which is updated in place.

    Args:
        plan: the plan; a dict needs ``batch_size``, ``max_length`` and ``notes``.
    """
    if isinstance(plan, Plan):
        plan.fit_batch()
        return
    Plan.fit_batch(_BatchView(plan))  # type: ignore[arg-type]  # the one rule, on the dict's values


class _BatchView:
    """The fields :meth:`Plan.fit_batch` reads and sets, kept in a dict (:func:`fit_batch`)."""

    def __init__(self, plan: dict):
        self.__dict__["_plan"] = plan

    def __getattr__(self, name: str):
        return self._plan.get(name)

    def __setattr__(self, name: str, value) -> None:
        self._plan[name] = value

    def note(self, text: str) -> None:
        self._plan["notes"].append(text)


def scratch_teacher(opts) -> str:
    """How the report names a teacher the study trained from scratch: its architecture and shape.

    Args:
        opts: the resolved options.

    Returns:
        The description.
    """
    shape = opts.plan.teacher
    if opts.task == "classification":
        return (
            f"trained from scratch (BERT, {shape['d_model']}-wide, {shape['layers']} layers: masked-LM "
            "pre-training, then fine-tuned on the labels)"
        )
    arch = {"mbart": "pre-LN BART (mBART-style)", "bart": "BART"}.get(
        SEQ2SEQ_TEACHER_ARCH, SEQ2SEQ_TEACHER_ARCH
    )
    return f"trained from scratch ({arch}, {shape['d_model']}-wide, {shape['layers']}+{shape['layers']} layers)"
