"""The seq2seq study (translation, summarization) -- Kim & Rush (2016)'s table:

transfer rows -> transfer set (teacher beam outputs + n-best, Seq-Inter choice)
-> student init (one per size and seed, saved once, copied by every variant)
-> baseline | word-kd | seq-kd | seq-kd+word-kd | seq-inter   (one stage each, per seed;
   each trained until its validation CE stops improving, within the budget's cap)
"""

from __future__ import annotations

import os
import shutil

from lmkd.core.io import atomic_write_json, read_rows, write_jsonl
from lmkd.study.models import (
    LOGIT_CACHE_DIR,
    cache_teacher_logits,
    save_model,
    train_student,
)
from lmkd.study.options import StudyOptions, seeded, student_seeds
from lmkd.study.plan import (
    LOGIT_CACHE_STAGES,
    SEQ2SEQ_VARIANTS,
    size_name,
    thread_options,
)
from lmkd.study.splits import (
    LABELLED,
    TEACHER_ROW,
    prepare_unlabelled,
    select_transfer_rows,
)
from lmkd.study.stages import Job, Stages
from lmkd.study.stopping import TRAIN_LOG, StoppingRule

#: the column each variant trains on: the gold target, the teacher's best beam, or Seq-Inter's pick
VARIANT_TARGET = {
    "baseline": "target",
    "word-kd": "target",
    "seq-kd": "teacher",
    "seq-kd+word-kd": "teacher",
    "seq-inter": "inter",
}


#: the transfer stage's record of how far the teacher's outputs on its transfer rows are the gold targets
MEMORISATION = "memorisation.json"


def _generate(
    teacher_dir: str, data_file: str, gen_dir: str, beams: int, max_new_tokens: int, max_length: int
) -> tuple[list[dict], dict]:
    """The teacher's beam n-best on ``data_file`` (rows in input order) and the generation's report;
    ``gen_dir`` is removed after."""
    from lmkd.teacher.pseudo_targets import JSONL_FILE, generate_pseudo_targets

    report = generate_pseudo_targets(
        teacher_dir,
        data=data_file,
        output_dir=gen_dir,
        source_column="source",
        num_beams=beams,
        num_return_sequences=beams,
        max_new_tokens=max_new_tokens,
        max_source_length=max_length,
        batch_size=64,
        output_format="jsonl",
    )
    rows = read_rows(os.path.join(gen_dir, JSONL_FILE))
    shutil.rmtree(gen_dir)
    return rows, report


def make_transfer_set(
    teacher_dir: str,
    data_file: str,
    out: str,
    beams: int,
    max_new_tokens: int,
    max_length: int,
    task: str = "translation",
    unlabelled_file: str | None = None,
) -> str:
    """The teacher's beam-search n-best on ``data_file``
    (:func:`lmkd.teacher.pseudo_targets.generate_pseudo_targets`) plus the Seq-Inter choice
    (:func:`lmkd.teacher.pseudo_targets.seq_inter_select`); returns the JSONL path with columns source,
    target (gold), teacher (best beam), inter (closest to the gold of the n-best), and the
    columns of ``data_file`` past those (``teacher_row`` with --teacher-split).  With ``unlabelled_file``
    (``--unlabelled``) its rows follow, ``labelled`` false, their target, teacher and inter all the teacher's
    best beam (no gold to pick by); the labelled rows then say ``labelled`` true.  Also writes
    :data:`MEMORISATION` (:func:`memorisation`, on the labelled rows) and ``generate_report.json``.

    Args:
        teacher_dir: the teacher.
        data_file: the transfer rows.
        out: the stage's directory.
        beams: the beam size (and the n-best size).
        max_new_tokens: the longest generation.
        max_length: inputs are cut at this many tokens.
        task: the study task (the memorisation figures' metric).
        unlabelled_file: the source-only rows (the data-unlabelled stage's file), or None.

    Returns:
        The path of ``transfer.jsonl``.
    """
    from lmkd.teacher.pseudo_targets import seq_inter_select

    gen = (beams, max_new_tokens, max_length)
    rows, report = _generate(teacher_dir, data_file, os.path.join(out, "generate"), *gen)
    if beams > 1:
        chosen, changed = seq_inter_select(
            [r["teacher_nbest"] for r in rows], [r["target"] for r in rows]
        )
    else:
        chosen, changed = [0] * len(rows), 0
    extra = [k for k in read_rows(data_file)[0] if k not in ("source", "target")]
    out_rows = [
        {
            "source": r["source"],
            "target": r["target"],
            "teacher": r["teacher_target"],
            "inter": r["teacher_nbest"][c] if beams > 1 else r["teacher_target"],
            **{k: r[k] for k in extra},
        }
        for r, c in zip(rows, chosen)
    ]
    if unlabelled_file is not None:
        plain, _ = _generate(
            teacher_dir, unlabelled_file, os.path.join(out, "generate-unlabelled"), *gen
        )
        out_rows = [{**r, LABELLED: True} for r in out_rows]
        out_rows += [
            {
                "source": r["source"],
                "target": r["teacher_target"],
                "teacher": r["teacher_target"],
                "inter": r["teacher_target"],
                LABELLED: False,
            }
            for r in plain
        ]
    path = os.path.join(out, "transfer.jsonl")
    write_jsonl(path, out_rows)
    atomic_write_json(
        os.path.join(out, "generate_report.json"),
        {**{k: v for k, v in report.items() if k != "output"}, "seq_inter_changed": changed},
    )
    atomic_write_json(os.path.join(out, MEMORISATION), memorisation(out_rows, task))
    return path


def _agreement(rows: list[dict], task: str) -> dict:
    """The teacher's best beam against the gold target on ``rows``: the check metric, the identical share."""
    from lmkd.study.checks import CHECK_METRIC, task_score

    same = sum(str(r["teacher"]).strip() == str(r["target"]).strip() for r in rows)
    return {
        "rows": len(rows),
        "metric": CHECK_METRIC[task],
        "score": (
            task_score(task, [r["teacher"] for r in rows], [r["target"] for r in rows])
            if rows
            else None
        ),
        "identical": same / len(rows) if rows else None,
    }


def memorisation(rows: list[dict], task: str) -> dict:
    """How far the teacher's outputs on its transfer rows are the gold targets again: on the labelled
    rows, its best beam scored against the gold (BLEU / ROUGE-2, the teacher check's metric) and the
    share identical to it after stripping whitespace; with --teacher-split the same on the rows the
    teacher trained on and on the held-out ones.

    Args:
        rows: the transfer set's rows (``target``, ``teacher``; ``labelled``, ``teacher_row`` when present).
        task: the study task.

    Returns:
        ``{"all": figures, "teacher_rows"?: figures, "held_out_rows"?: figures, "unlabelled_rows": n}``,
        figures being ``{"rows", "metric", "score", "identical"}``.
    """
    gold = [r for r in rows if r.get(LABELLED, True)]
    out = {"all": _agreement(gold, task), "unlabelled_rows": len(rows) - len(gold)}
    if any(TEACHER_ROW in r for r in gold):
        out["teacher_rows"] = _agreement([r for r in gold if r[TEACHER_ROW]], task)
        out["held_out_rows"] = _agreement([r for r in gold if not r[TEACHER_ROW]], task)
    return out


def read_memorisation(transfer_dir: str, task: str) -> dict:
    """The transfer stage's :data:`MEMORISATION`, or -- a stage made before it was written -- the same
    figures computed from its ``transfer.jsonl``.

    Args:
        transfer_dir: the transfer stage's directory.
        task: the study task.

    Returns:
        The figures (:func:`memorisation`).
    """
    import json

    path = os.path.join(transfer_dir, MEMORISATION)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return memorisation(read_rows(os.path.join(transfer_dir, "transfer.jsonl")), task)


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
    """The transfer stage as a study job: :func:`make_transfer_set` into ``out``.

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


def _fewest_copied_layers(teacher) -> dict[str, list[int]] | None:
    """The smallest student made of copied teacher layers: one encoder and one decoder layer (the
    first, :func:`~lmkd.models.student.spread_layers`); None for a model without both stacks."""
    from lmkd.models.student import spread_layers, stacks_of

    stacks = stacks_of(teacher)
    if set(stacks) != {"encoder", "decoder"}:
        return None
    config = teacher.config
    return {
        name: spread_layers(getattr(config, f) or config.num_layers, 1)
        for name, (_, f) in stacks.items()
    }


def _student_init(
    teacher_dir: str, fraction: float, seed: int, out: str, copy_fewest: bool = False
) -> None:
    """The largest student within ``fraction`` of the teacher's parameters: copied teacher layers
    when they fit (shrink-and-fine-tune), else -- ``copy_fewest`` (a given, trained teacher) -- the
    fewest layers that can be copied (one encoder and one decoder layer: larger than asked), else a
    fresh, narrower model of the teacher's shape.  ``init.json`` says which, with the layers, the
    shape and the parameter share.

    Args:
        teacher_dir: the teacher.
        fraction: the asked share of the teacher's parameters.
        seed: the fresh model's seed.
        out: the stage's directory.
        copy_fewest: copy the fewest layers when none fit within ``fraction``.
    """
    import torch

    from lmkd.models.loading import AUTO_CLASS, load_model, load_tokenizer, model_kind
    from lmkd.models.size import count_parameters
    from lmkd.models.student import (
        copied_layers_within,
        make_student,
        scaled_student_config,
    )

    teacher = load_model(teacher_dir)
    copied = copied_layers_within(teacher, fraction)
    larger = False
    if copied is None and copy_fewest:
        copied = _fewest_copied_layers(teacher)
        larger = copied is not None
    if copied is not None:
        student = make_student(
            teacher, encoder_layers=copied["encoder"], decoder_layers=copied["decoder"]
        )
    else:
        torch.manual_seed(seed)
        student = AUTO_CLASS[model_kind(teacher)].from_config(
            scaled_student_config(teacher, fraction)
        )
    save_model(student, load_tokenizer(teacher_dir), out)
    share = count_parameters(student) / count_parameters(teacher)
    atomic_write_json(
        os.path.join(out, "init.json"),
        {
            "init": "copied teacher layers" if copied else "fresh",
            "layers": copied,
            "asked": fraction,
            "parameters_vs_teacher": share,
            "larger_than_asked": larger,
            "shape": init_shape(student.config),
        },
        indent=None,
    )


def init_shape(config) -> dict:
    """A seq2seq model's shape as the report names it: width and layers per stack.

    Args:
        config: the model's config (or its config.json as a dict).

    Returns:
        ``{"d_model", "encoder_layers", "decoder_layers"}`` (a missing field: None).
    """
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    return {k: get(k) for k in ("d_model", "encoder_layers", "decoder_layers")}


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
                lambda out, fraction=fraction, seed=seed: _student_init(
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
                    + f", until its validation CE stops improving (at most {plan.student_steps} steps)"
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
