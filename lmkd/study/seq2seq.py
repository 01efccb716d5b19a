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
from lmkd.study.splits import select_transfer_rows
from lmkd.study.stages import Job, Stages
from lmkd.study.stopping import TRAIN_LOG, StoppingRule

#: the column each variant trains on: the gold target, the teacher's best beam, or Seq-Inter's pick
VARIANT_TARGET = {"baseline": "target", "word-kd": "target", "seq-kd": "teacher", "seq-kd+word-kd": "teacher",
                  "seq-inter": "inter"}


def make_transfer_set(teacher_dir: str, data_file: str, out: str, beams: int, max_new_tokens: int,
                      max_length: int) -> str:
    """The teacher's beam-search n-best on ``data_file`` (:func:`lmkd.teacher.pseudo_targets.generate_pseudo_targets`)
    plus the Seq-Inter choice (:func:`lmkd.teacher.pseudo_targets.seq_inter_select`); returns the JSONL path with
    columns source, target (gold), teacher (best beam), inter (closest to the gold of the n-best).

    Args:
        teacher_dir: the teacher.
        data_file: the transfer rows.
        out: the stage's directory.
        beams: the beam size (and the n-best size).
        max_new_tokens: the longest generation.
        max_length: inputs are cut at this many tokens.

    Returns:
        The path of ``transfer.jsonl``.
    """
    from lmkd.teacher.pseudo_targets import (
        JSONL_FILE,
        generate_pseudo_targets,
        seq_inter_select,
    )

    gen_dir = os.path.join(out, "generate")
    report = generate_pseudo_targets(teacher_dir, data=data_file, output_dir=gen_dir, source_column="source",
                                     num_beams=beams, num_return_sequences=beams, max_new_tokens=max_new_tokens,
                                     max_source_length=max_length, batch_size=64, output_format="jsonl")
    rows = read_rows(os.path.join(gen_dir, JSONL_FILE))
    if beams > 1:
        chosen, changed = seq_inter_select([r["teacher_nbest"] for r in rows], [r["target"] for r in rows])
    else:
        chosen, changed = [0] * len(rows), 0
    out_rows = [{"source": r["source"], "target": r["target"], "teacher": r["teacher_target"],
                 "inter": r["teacher_nbest"][c] if beams > 1 else r["teacher_target"]}
                for r, c in zip(rows, chosen)]
    path = os.path.join(out, "transfer.jsonl")
    write_jsonl(path, out_rows)
    atomic_write_json(os.path.join(out, "generate_report.json"),
                      {**{k: v for k, v in report.items() if k != "output"}, "seq_inter_changed": changed})
    shutil.rmtree(gen_dir)
    return path


def transfer_stage(out: str, teacher_dir: str, data_file: str, beams: int, max_new_tokens: int,
                   max_length: int) -> None:
    """The transfer stage as a study job: :func:`make_transfer_set` into ``out``.

    Args:
        out: the stage's directory.
        teacher_dir: the teacher.
        data_file: the transfer rows.
        beams: the beam size (and the n-best size).
        max_new_tokens: the longest generation.
        max_length: inputs are cut at this many tokens.
    """
    make_transfer_set(teacher_dir, data_file, out, beams, max_new_tokens, max_length)


def _student_init(teacher_dir: str, fraction: float, seed: int, out: str) -> None:
    """The largest student within ``fraction`` of the teacher's parameters: copied teacher layers
    when they fit (shrink-and-fine-tune), else a fresh, narrower model of the teacher's shape."""
    import torch

    from lmkd.models.loading import AUTO_CLASS, load_model, load_tokenizer, model_kind
    from lmkd.models.student import (
        copied_layers_within,
        make_student,
        scaled_student_config,
    )

    teacher = load_model(teacher_dir)
    copied = copied_layers_within(teacher, fraction)
    if copied is not None:
        student = make_student(teacher, encoder_layers=copied["encoder"], decoder_layers=copied["decoder"])
    else:
        torch.manual_seed(seed)
        student = AUTO_CLASS[model_kind(teacher)].from_config(scaled_student_config(teacher, fraction))
    save_model(student, load_tokenizer(teacher_dir), out)
    atomic_write_json(os.path.join(out, "init.json"),
                      {"init": "copied teacher layers" if copied else "fresh", "layers": copied}, indent=None)


def seq2seq_students(st: Stages, opts: StudyOptions, data: dict, teacher_dir: str) -> tuple[dict[str, dict], list[Job]]:
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
    rows_dir = st.run("transfer-rows", {"rows": plan.transfer_rows, "seed": opts.seed}, ["data-train"],
                      lambda out: select_transfer_rows(data["train"], plan.transfer_rows, opts.seed, out),
                      "choosing the transfer set (the rows every student learns from)")
    rows_file = data["transfer_rows"] = os.path.join(rows_dir, "transfer.jsonl")
    gen_opts = {"beams": plan.beams, "max_new_tokens": plan.max_new_tokens}
    # a job of the graph: the students that read only the gold targets (baseline, Word-KD and its logit
    # cache) train while the teacher decodes every training row; costliest, so it starts first
    transfer = Job("transfer", gen_opts, ["teacher", "transfer-rows"], transfer_stage,
                   dict(teacher_dir=teacher_dir, data_file=rows_file, beams=plan.beams,
                        max_new_tokens=plan.max_new_tokens, max_length=plan.max_length),
                   f"teacher beam search (beam {plan.beams}) on the transfer set", cost=10.0)
    transfer_file = os.path.join(st.path("transfer"), "transfer.jsonl")
    jobs, caches = _logit_cache_jobs(st, opts, data, teacher_dir, rows_file, transfer_file)
    jobs.insert(0, transfer)

    students: dict[str, dict] = {}
    stopping = StoppingRule.from_plan(plan, opts.task)
    kd = {"kd_alpha": plan.kd_alpha, "kd_temperature": plan.kd_temperature}
    if plan.logit_cache:  # (an online student's options are those of the studies made before the cache)
        kd["kd_cache"] = plan.logit_cache  # (a hashed key keeps its name: a resumed study keeps its students)
    for fraction in opts.student_sizes:
        size = size_name(fraction)
        for seed in student_seeds(opts):
            init = seeded(f"{size}-init", opts, seed)
            init_dir = st.run(init, {"fraction": fraction, "seed": seed, "rule": "copy-if-fits"},
                              ["teacher"], lambda out, fraction=fraction, seed=seed: _student_init(
                                  teacher_dir, fraction, seed, out),
                              f"the student init with <= {fraction:g} of the teacher's parameters (seed {seed})")
            student_opts = {"steps": plan.student_steps, "lr": plan.student_lr, "batch": plan.batch_size,
                            "warmup": plan.warmup_steps, "max_length": plan.max_length, "seed": seed,
                            "stopping": stopping.options(), **thread_options(plan)}
            for variant in SEQ2SEQ_VARIANTS:
                word = "word-kd" in variant
                target = VARIANT_TARGET[variant]
                data_file = rows_file if target == "target" else transfer_file
                deps = [init, "data-validation"] + (["transfer"] if target != "target" else ["transfer-rows"]) + \
                    (["teacher"] if word else [])
                teacher = {}
                if word and caches:  # the teacher's cached log-probs of these targets, and of the validation rows
                    deps += [caches[target], caches["validation"]]
                    teacher = dict(
                        logit_cache=os.path.join(st.path(caches[target]), LOGIT_CACHE_DIR),
                        eval_logit_cache=os.path.join(st.path(caches["validation"]), LOGIT_CACHE_DIR))
                elif word:
                    teacher = dict(teacher_dir=teacher_dir)
                kwargs = dict(init_dir=init_dir, task=opts.task, train_file=data_file,
                              validation_file=data["validation"], plan=plan, steps=plan.student_steps,
                              lr=plan.student_lr, target_column=target,
                              kd_alpha=plan.kd_alpha if word else 0.0,
                              seed=seed, stopping=stopping.options(), **teacher)
                name = seeded(f"{size}-{variant}", opts, seed)
                what = (f"training student {variant} (seed {seed}): targets = {target}"
                        + (f", word-level KD alpha {plan.kd_alpha}" + (" (cached teacher)" if caches else "")
                           if word else "")
                        + f", until its validation CE stops improving (at most {plan.student_steps} steps)")
                # an online Word-KD step also runs the teacher: 2.5x a plain one; from the cache about 1.05x
                cost = (1.2 if caches else 2.0) if word else 1.0
                jobs.append(Job(name, {**student_opts, "target": target, **(kd if word else {})}, deps,
                                train_student, kwargs, what, cost=cost))
                students[name] = {"stage": name, "variant": variant, "size": fraction, "seed": seed,
                                  "dir": st.path(name), "train_log": os.path.join(st.path(name), TRAIN_LOG)}
    return students, jobs


def _logit_cache_jobs(st: Stages, opts: StudyOptions, data: dict, teacher_dir: str, rows_file: str,
                      transfer_file: str) -> tuple[list[Job], dict[str, str]]:
    """The jobs making the logit caches (the teacher's log-probs, ``plan.logit_cache``; none with
    --online-kd) on the validation rows and on the transfer rows with each target column a Word-KD variant
    trains on (word-kd: the gold targets; seq-kd+word-kd: the teacher's); returns them and their names
    (:data:`~lmkd.study.plan.LOGIT_CACHE_STAGES`: ``{target column or "validation": stage name}``)."""
    settings = opts.plan.logit_cache
    if not settings:
        return [], {}
    # the thread count, as for the students: the tail draws depend on the last digits of the teacher's probabilities
    options = {**settings, "max_length": opts.plan.max_length, "seed": opts.seed, **thread_options(opts.plan)}
    what = f"caching the teacher's top-{settings['top_k']} log-probs (+{settings['tail_samples']} sampled) "
    spec = {"validation": (data["validation"], "target", "data-validation", "on the validation rows"),
            "target": (rows_file, "target", "transfer-rows", "on the transfer rows' gold targets"),
            "teacher": (transfer_file, "teacher", "transfer", "on the teacher's own beam outputs")}
    jobs = []
    for key, (data_file, column, dep, where) in spec.items():
        jobs.append(Job(LOGIT_CACHE_STAGES[key], {**options, "column": column}, ["teacher", dep],
                        cache_teacher_logits,
                        dict(teacher_dir=teacher_dir, data_file=data_file, target_column=column, plan=opts.plan,
                             seed=opts.seed), what + where, cost=4.0))  # the Word-KD students wait for them
    return jobs, LOGIT_CACHE_STAGES
