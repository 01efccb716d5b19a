"""The seq2seq study (translation, summarization) -- Kim & Rush (2016)'s table:

transfer rows -> transfer set (teacher beam outputs + n-best, Seq-Inter choice)
-> student init (one per size and seed, saved once, copied by every variant)
-> baseline | word-kd | seq-kd | seq-kd+word-kd | seq-inter   (one stage each, per seed;
   each trained until its validation task metric stops improving, within the budget's cap)
"""

from __future__ import annotations

import os

from lmkd.study.models import LOGIT_CACHE_DIR, cache_teacher_logits, train_student
from lmkd.study.options import StudyOptions, seeded, student_seeds
from lmkd.study.plan import (
    LOGIT_CACHE_STAGES,
    SEQ2SEQ_VARIANTS,
    size_name,
    thread_options,
)
from lmkd.study.splits import prepare_unlabelled, select_transfer_rows
from lmkd.study.stages import Job, Stages
from lmkd.study.stopping import TRAIN_LOG, StoppingRule
from lmkd.study.student_init import student_init
from lmkd.study.transfer import make_transfer_set

#: the column each variant trains on: the gold target, the teacher's best beam, or Seq-Inter's pick
VARIANT_TARGET = {
    "baseline": "target",
    "word-kd": "target",
    "seq-kd": "teacher",
    "seq-kd+word-kd": "teacher",
    "seq-inter": "inter",
}


def transfer_stage(
    out: str,
    teacher_dir: str,
    data_file: str,
    beams: int,
    max_new_tokens: int,
    max_length: int,
    task: str = "translation",
    unlabelled_file: str | None = None,
) -> None:
    """The transfer stage as a study job: :func:`~lmkd.study.transfer.make_transfer_set` into ``out``.

    Args:
        out: the stage's directory.
        teacher_dir: the teacher.
        data_file: the transfer rows.
        beams: the beam size (and the n-best size).
        max_new_tokens: the longest generation.
        max_length: inputs are cut at this many tokens.
        task: the study task (the memorisation figures' metric).
        unlabelled_file: source-only rows added to the KD variants' transfer set (--unlabelled), or None.
    """
    make_transfer_set(
        teacher_dir, data_file, out, beams, max_new_tokens, max_length, task, unlabelled_file
    )


def seq2seq_students(
    st: Stages, opts: StudyOptions, data: dict, teacher_dir: str
) -> tuple[dict[str, dict], list[Job]]:
    """The transfer-set stages, then the jobs of every variant of every student size and seed (and of
    the logit caches the Word-KD variants read), for the caller to run with its other jobs; returns
    the students as ``{stage name: {"dir", "stage", "variant", "size", "seed", "train_log"}}`` and the
    jobs (``data["transfer_rows"]`` is set).  The teacher, its caches and the transfer set are shared
    by all seeds; each seed has its own init (shared by that seed's variants) and data order.  Every
    student stops on its validation plateau (:class:`~lmkd.study.stopping.StoppingRule`),
    ``student_steps`` being the cap.

    Args:
        st: the study's stages.
        opts: the resolved options.
        data: the data stages' paths.
        teacher_dir: the teacher.

    Returns:
        ``(students, jobs)``.
    """
    plan = opts.plan
    # (None: every training row; with --teacher-split always all: the held-out rows are its point)
    n_rows = None if opts.teacher_split is not None else getattr(plan, "transfer_rows", None)
    rows_opts, rows_deps = {"rows": n_rows, "seed": opts.seed}, ["data-train"]
    if opts.teacher_split is not None:  # each row says whether the teacher trained on it
        rows_opts["teacher_split"] = opts.teacher_split
        rows_deps.append("teacher-rows")
    rows_dir = st.run(
        "transfer-rows",
        rows_opts,
        rows_deps,
        lambda out: select_transfer_rows(
            data["train"], n_rows, opts.seed, out, data.get("teacher_train")
        ),
        "choosing the transfer set (the rows every student learns from)",
    )
    rows_file = data["transfer_rows"] = os.path.join(rows_dir, "transfer.jsonl")
    gen_opts: dict = {"beams": plan.beams, "max_new_tokens": plan.max_new_tokens}
    unlabelled_file, transfer_deps = None, ["teacher", "transfer-rows"]
    if opts.unlabelled is not None:
        from lmkd.core.io import file_digest

        u_opts = {"file": file_digest(opts.unlabelled), "column": opts.source_column}
        u_dir = st.run(
            "data-unlabelled",
            u_opts,
            [],
            lambda out: prepare_unlabelled(opts.unlabelled, opts.source_column, out),
            "reading the source-only rows (--unlabelled)",
        )
        unlabelled_file = os.path.join(u_dir, "unlabelled.jsonl")
        gen_opts["unlabelled"] = True
        transfer_deps.append("data-unlabelled")

    # a job of the graph: the students that read only the gold targets (baseline, Word-KD and its logit
    # cache) train while the teacher decodes every training row; costliest, so it starts first
    transfer = Job(
        "transfer",
        gen_opts,
        transfer_deps,
        transfer_stage,
        dict(
            teacher_dir=teacher_dir,
            data_file=rows_file,
            beams=plan.beams,
            max_new_tokens=plan.max_new_tokens,
            max_length=plan.max_length,
            task=opts.task,
            unlabelled_file=unlabelled_file,
        ),
        f"teacher beam search (beam {plan.beams}) on the transfer set",
        cost=10.0,
    )
    transfer_dir = st.path("transfer")
    transfer_file = os.path.join(transfer_dir, "transfer.jsonl")
    data["transfer_dir"] = (
        transfer_dir  # (the report reads its memorisation figures: read_memorisation)
    )
    # each variant's training file and the stage it comes from: the baseline keeps the gold rows only; with
    # --unlabelled Word-KD also reads the transfer set (its unlabelled rows' target: the teacher's best beam)
    train_files = {
        v: (rows_file, "transfer-rows")
        if v == "baseline" or (VARIANT_TARGET[v] == "target" and unlabelled_file is None)
        else (transfer_file, "transfer")
        for v in SEQ2SEQ_VARIANTS
    }
    jobs, caches = _logit_cache_jobs(
        st, opts, data, teacher_dir, train_files["word-kd"], transfer_file
    )
    jobs.insert(0, transfer)
    init_rule = "copy-if-fits" if opts.teacher is None else "copy-if-fits-else-fewest"

    students: dict[str, dict] = {}
    stopping = StoppingRule.from_plan(plan, opts.task)
    kd = {"kd_alpha": plan.kd_alpha, "kd_temperature": plan.kd_temperature}
    if (
        plan.logit_cache
    ):  # (an online student's options are those of the studies made before the cache)
        kd["kd_cache"] = (
            plan.logit_cache
        )  # (a hashed key keeps its name: a resumed study keeps its students)
    for fraction in opts.student_sizes:
        size = size_name(fraction)
        for seed in student_seeds(opts):
            init = seeded(f"{size}-init", opts, seed)
            init_dir = st.run(
                init,
                {"fraction": fraction, "seed": seed, "rule": init_rule},
                ["teacher"],
                lambda out, fraction=fraction, seed=seed: student_init(
                    teacher_dir, fraction, seed, out, init_rule != "copy-if-fits"
                ),
                f"the student init with <= {fraction:g} of the teacher's parameters (seed {seed})",
            )
            data.setdefault("inits", []).append({"size": fraction, "seed": seed, "dir": init_dir})
            student_opts = {
                "steps": plan.student_steps,
                "lr": plan.student_lr,
                "batch": plan.batch_size,
                "warmup": plan.warmup_steps,
                "max_length": plan.max_length,
                "seed": seed,
                "stopping": stopping.options(),
                **thread_options(plan),
            }
            for variant in SEQ2SEQ_VARIANTS:
                word = "word-kd" in variant
                target = VARIANT_TARGET[variant]
                data_file, rows_dep = train_files[variant]
                deps = [init, "data-validation", rows_dep] + (["teacher"] if word else [])
                teacher = {}
                if (
                    word and caches
                ):  # the teacher's cached log-probs of these targets, and of the validation rows
                    deps += [caches[target], caches["validation"]]
                    teacher = dict(
                        logit_cache=os.path.join(st.path(caches[target]), LOGIT_CACHE_DIR),
                        eval_logit_cache=os.path.join(
                            st.path(caches["validation"]), LOGIT_CACHE_DIR
                        ),
                    )
                elif word:
                    teacher = dict(teacher_dir=teacher_dir)
                kwargs = dict(
                    init_dir=init_dir,
                    task=opts.task,
                    train_file=data_file,
                    validation_file=data["validation"],
                    plan=plan,
                    steps=plan.student_steps,
                    lr=plan.student_lr,
                    target_column=target,
                    kd_alpha=plan.kd_alpha if word else 0.0,
                    seed=seed,
                    stopping=stopping.options(),
                    **teacher,
                )
                name = seeded(f"{size}-{variant}", opts, seed)
                what = (
                    f"training student {variant} (seed {seed}): targets = {target}"
                    + (
                        f", word-level KD alpha {plan.kd_alpha}"
                        + (" (cached teacher)" if caches else "")
                        if word
                        else ""
                    )
                    + f", until its validation {stopping.metric.removeprefix('eval_')} stops improving"
                    + f" (at most {plan.student_steps} steps)"
                )
                # an online Word-KD step also runs the teacher: 2.5x a plain one; from the cache about 1.05x
                cost = (1.2 if caches else 2.0) if word else 1.0
                jobs.append(
                    Job(
                        name,
                        {**student_opts, "target": target, **(kd if word else {})},
                        deps,
                        train_student,
                        kwargs,
                        what,
                        cost=cost,
                    )
                )
                students[name] = {
                    "stage": name,
                    "variant": variant,
                    "size": fraction,
                    "seed": seed,
                    "dir": st.path(name),
                    "train_log": os.path.join(st.path(name), TRAIN_LOG),
                }
    return students, jobs


def _logit_cache_jobs(
    st: Stages,
    opts: StudyOptions,
    data: dict,
    teacher_dir: str,
    word_kd: tuple[str, str],
    transfer_file: str,
) -> tuple[list[Job], dict[str, str]]:
    """The jobs making the logit caches (the teacher's log-probs, ``plan.logit_cache``; none with
    --online-kd) on the validation rows and on the transfer rows with each target column a Word-KD variant
    trains on (word-kd: the gold targets, in ``word_kd``'s file from its stage; seq-kd+word-kd: the
    teacher's); returns them and their names
    (:data:`~lmkd.study.plan.LOGIT_CACHE_STAGES`: ``{target column or "validation": stage name}``)."""
    settings = opts.plan.logit_cache
    if not settings:
        return [], {}
    # the thread count, as for the students: the tail draws depend on the last digits of the teacher's probabilities
    options = {
        **settings,
        "max_length": opts.plan.max_length,
        "seed": opts.seed,
        **thread_options(opts.plan),
    }
    what = f"caching the teacher's top-{settings['top_k']} log-probs (+{settings['tail_samples']} sampled) "
    spec = {
        "validation": (data["validation"], "target", "data-validation", "on the validation rows"),
        "target": (*word_kd[:1], "target", word_kd[1], "on the transfer rows' gold targets"),
        "teacher": (transfer_file, "teacher", "transfer", "on the teacher's own beam outputs"),
    }
    jobs = []
    for key, (data_file, column, dep, where) in spec.items():
        jobs.append(
            Job(
                LOGIT_CACHE_STAGES[key],
                {**options, "column": column},
                ["teacher", dep],
                cache_teacher_logits,
                dict(
                    teacher_dir=teacher_dir,
                    data_file=data_file,
                    target_column=column,
                    plan=opts.plan,
                    seed=opts.seed,
                ),
                what + where,
                cost=4.0,
            )
        )  # the Word-KD students wait for them
    return jobs, LOGIT_CACHE_STAGES
