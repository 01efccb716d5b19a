"""``lmkd study --task causal-lm``: a decoder-only teacher and its students on prompt/response rows.

    data (prompt, completion) -> tokenizer -> teacher (a Llama-style causal LM, or --teacher) + its check
         -> transfer set (the teacher's beam response to every training prompt: Seq-KD's targets)
         -> student init (a fraction of the teacher's layers, copied; one per seed)
         -> sft | seq-kd | fkl | rkl | jsd | skew-kl | taid | on-policy   (one stage each, per seed;
            each trained on every training row until its validation ROUGE-L stops improving)
            and the eval of every model as soon as it is ready
         -> speed (all models, interleaved) -> report (report.md / .json / .png)

The pieces are :mod:`lmkd.study.causal_lm` (data, training) and :mod:`lmkd.study.causal_lm_eval`
(generation, the check, the evaluation); the verdicts are :mod:`lmkd.study.verdicts`' paired bootstrap
on ROUGE-L (and chrF), every variant against ``sft``, surviving the seeds' spread.
"""

from __future__ import annotations

import json
import os
import shutil

from lmkd.core.io import atomic_write_json, file_digest, read_rows
from lmkd.study.causal_lm import (
    CAUSAL_TEACHER_ARCH,
    CAUSAL_VARIANTS,
    NO_TEACHER_VARIANTS,
    VARIANT_SETTINGS,
    causal_student_init,
    train_causal,
)
from lmkd.study.causal_lm_data import SEPARATOR, prepare_causal_split
from lmkd.study.causal_lm_eval import (
    causal_speed,
    check_causal_teacher,
    check_summary,
    evaluate_causal,
    transfer_stage,
    trivial_floors,
)
from lmkd.study.causal_lm_report import build_causal_report, write_causal_report
from lmkd.study.checks import TeacherDidNotLearn
from lmkd.study.options import StudyOptions, seeded, student_seeds
from lmkd.study.plan import size_name, thread_options
from lmkd.study.stages import Job, Stages
from lmkd.study.stopping import StoppingRule


def _total(opts: StudyOptions) -> int:
    n = len(opts.student_sizes) * opts.seeds
    return 3 + 2 + 1 + n * (1 + len(CAUSAL_VARIANTS)) + 1 + n * len(CAUSAL_VARIANTS) + 2


def _teacher(st: Stages, opts: StudyOptions, data: dict) -> str:
    """The teacher's stages (a given one and its check, or a tokenizer and a Llama-style teacher trained
    here and checked); returns its dir.  A failed check stops the study (:class:`TeacherDidNotLearn`)."""
    plan = opts.plan
    check_opts = {"on": opts.teacher_check, "rows": plan.check_rows, "v": 1}

    def check(model_dir: str) -> dict:
        if not opts.teacher_check:
            return {"passed": True, "skipped": True}
        return check_causal_teacher(
            model_dir,
            read_rows(data["train"]),
            read_rows(data["validation"]),
            plan,
            rows=plan.check_rows,
            seed=opts.seed,
        )

    def refuse(c: dict, advice: str) -> None:
        raise TeacherDidNotLearn(
            f"the teacher did not learn: {'; '.join(c['reasons'])}; no student is compared with it "
            f"and no report is written -- {advice} (or pass --skip-teacher-check)"
        )

    if opts.teacher is not None:
        given = {"path": os.path.abspath(opts.teacher), "digest": file_digest(opts.teacher)}
        st.run("teacher", given, [], lambda out: None, "using the given teacher")

        def check_fn(out):
            c = check(opts.teacher)
            if not c["passed"]:
                refuse(c, "give a teacher that has learned this task")
            atomic_write_json(os.path.join(out, "teacher_check.json"), c)

        d = st.run(
            "teacher-check",
            check_opts,
            ["teacher", "data-train", "data-validation"],
            check_fn,
            "checking that the given teacher has learned the task",
        )
        data["check_dir"] = d
        return opts.teacher
    from lmkd.models.scratch import build_model, train_tokenizer

    def tokenizer_fn(out):
        rows = read_rows(data["train"])
        texts = [r["prompt"] + SEPARATOR + r["completion"] for r in rows]
        train_tokenizer(texts, vocab_size=plan.vocab_size).save_pretrained(out)

    tok_dir = st.run(
        "tokenizer",
        {"vocab_size": plan.vocab_size},
        ["data-train"],
        tokenizer_fn,
        f"training a {plan.vocab_size}-token BPE tokenizer",
    )
    shape = plan.teacher
    teacher_opts = {
        "arch": CAUSAL_TEACHER_ARCH,
        "shape": shape,
        "steps": plan.teacher_steps,
        "lr": plan.teacher_lr,
        "batch": plan.batch_size,
        "warmup": plan.warmup_steps,
        "max_length": plan.max_length,
        "max_new_tokens": plan.max_new_tokens,
        "seed": opts.seed,
        "check": check_opts,
    }

    def teacher_fn(out):
        from lmkd.models.loading import load_tokenizer

        tok = load_tokenizer(tok_dir)
        init = os.path.join(out, "init")
        model = build_model(
            CAUSAL_TEACHER_ARCH, len(tok), seed=opts.seed, max_positions=plan.positions, **shape
        )
        model.save_pretrained(init)
        tok.save_pretrained(init)
        rounds, start, lr = [], init, plan.teacher_lr
        for r in (1, 2):  # a teacher that failed trains one more round at half the rate
            dest = os.path.join(out, f"round-{r}")
            train_causal(
                dest,
                start,
                data["train"],
                data["validation"],
                plan,
                variant="sft",
                steps=plan.teacher_steps,
                lr=lr,
                seed=opts.seed,
            )
            c = check(dest)
            rounds.append({"round": r, "steps": plan.teacher_steps, "lr": lr, **c})
            print(f"  teacher check, round {r}: {check_summary(c)}", flush=True)
            if c["passed"] or r == 2:
                break
            start, lr = dest, lr / 2
        if not rounds[-1]["passed"]:
            refuse(rounds[-1], "train it longer (--teacher-steps) or give a trained --teacher")
        for name in os.listdir(dest):
            shutil.move(os.path.join(dest, name), os.path.join(out, name))
        for p in [init] + [os.path.join(out, f"round-{r}") for r in (1, 2)]:
            shutil.rmtree(p, ignore_errors=True)
        atomic_write_json(os.path.join(out, "teacher_check.json"), {"rounds": rounds, **rounds[-1]})

    n = f"{shape['d_model']}-wide, {shape['layers']} layers"
    d = st.run(
        "teacher",
        teacher_opts,
        ["tokenizer", "data-train", "data-validation"],
        teacher_fn,
        f"training a Llama-style causal teacher ({n}) for {plan.teacher_steps} steps",
    )
    data["check_dir"] = d
    return d


def causal_students(
    st: Stages, opts: StudyOptions, data: dict, teacher_dir: str
) -> tuple[dict, list[Job]]:
    """The transfer set, the inits and every variant's job, per size and seed.

    Args:
        st: the study's stages.
        opts: the resolved options.
        data: the data stages' paths.
        teacher_dir: the teacher.

    Returns:
        ``(students, jobs)``: ``{stage name: {"dir", "stage", "variant", "size", "seed"}}`` and the jobs.
    """
    plan = opts.plan
    plan_dict = plan.to_dict()
    jobs = [
        Job(
            "transfer",
            {"beams": plan.beams, "max_new_tokens": plan.max_new_tokens},
            ["teacher", "data-train"],
            transfer_stage,
            dict(teacher_dir=teacher_dir, train_file=data["train"], plan=plan_dict),
            f"the teacher's responses (beam {plan.beams}) to every training prompt",
            cost=10.0,
        )
    ]
    transfer_file = os.path.join(st.path("transfer"), "transfer.jsonl")
    stopping = StoppingRule.from_plan(plan, "causal-lm")
    students: dict[str, dict] = {}
    for fraction in opts.student_sizes:
        size = size_name(fraction)
        for seed in student_seeds(opts):
            init = seeded(f"{size}-init", opts, seed)
            init_dir = st.run(
                init,
                {"fraction": fraction, "rule": "copied-layers"},
                ["teacher"],
                lambda out, f=fraction: causal_student_init(out, teacher_dir, f),
                f"the student init: {fraction:g} of the teacher's layers, copied",
            )
            data.setdefault("inits", []).append({"size": fraction, "seed": seed, "dir": init_dir})
            for variant in CAUSAL_VARIANTS:
                name = seeded(f"{size}-{variant}", opts, seed)
                kd = variant not in NO_TEACHER_VARIANTS
                seq = variant == "seq-kd"
                options = {
                    "steps": plan.student_steps,
                    "lr": plan.student_lr,
                    "batch": plan.batch_size,
                    "warmup": plan.warmup_steps,
                    "max_length": plan.max_length,
                    "max_new_tokens": plan.max_new_tokens,
                    "seed": seed,
                    "stopping": stopping.options(),
                    "settings": VARIANT_SETTINGS[variant],
                    **(
                        {"kd_alpha": plan.kd_alpha, "kd_temperature": plan.kd_temperature}
                        if kd
                        else {}
                    ),
                    **thread_options(plan),
                }
                deps = [init, "data-validation", "transfer" if seq else "data-train"]
                deps += ["teacher"] if kd else []
                kwargs = dict(
                    init_dir=init_dir,
                    train_file=transfer_file if seq else data["train"],
                    validation_file=data["validation"],
                    plan=plan_dict,
                    variant=variant,
                    steps=plan.student_steps,
                    lr=plan.student_lr,
                    seed=seed,
                    teacher_dir=teacher_dir if kd else None,
                    stopping=stopping.options(),
                )
                what = (
                    f"training student {variant} (seed {seed}) until its validation ROUGE-L stops "
                    f"improving (at most {plan.student_steps} steps)"
                )
                cost = 3.0 if variant == "on-policy" else 2.0 if kd else 1.0
                jobs.append(Job(name, options, deps, train_causal, kwargs, what, cost=cost))
                students[name] = {
                    "stage": name,
                    "variant": variant,
                    "size": fraction,
                    "seed": seed,
                    "dir": st.path(name),
                }
    return students, jobs


def run_causal_study(opts: StudyOptions, after_stage=None) -> dict:
    """Run (or resume) a causal-LM study of resolved ``opts``; returns the report (also written).

    Args:
        opts: the resolved options (task causal-lm).
        after_stage: called with each stage's name after it ran (:class:`~lmkd.study.stages.Stages`).

    Returns:
        The report.
    """
    plan = opts.plan
    # the position tables of a teacher built here: the longest prompt, its separator and response
    plan.positions = plan.max_length + plan.max_new_tokens + 8
    os.makedirs(opts.output, exist_ok=True)
    st = Stages(opts.output, _total(opts), after_stage=after_stage)
    print(f"lmkd study: causal-lm, budget {opts.budget}, output {opts.output}", flush=True)
    data: dict = {}
    for split in ("train", "validation", "test"):
        path = getattr(opts, split)
        split_opts = {
            "file": file_digest(path),
            "columns": [opts.source_column, opts.target_column],
            "instruction": opts.instruction,
            "rows": getattr(plan, f"{split}_rows"),
        }
        d = st.run(
            f"data-{split}",
            split_opts,
            [],
            lambda out, p=path, s=split, o=split_opts: prepare_causal_split(
                out, p, opts.source_column, opts.target_column, opts.instruction, o["rows"], s
            ),
            f"reading the {split} prompts and responses",
        )
        data[split] = os.path.join(d, f"{split}.jsonl")
    teacher_dir = _teacher(st, opts, data)
    models = {
        "teacher": {
            "dir": teacher_dir,
            "stage": "teacher",
            "variant": "teacher",
            "size": None,
            "seed": None,
        }
    }
    students, jobs = causal_students(st, opts, data, teacher_dir)
    models.update(students)
    plan_dict = plan.to_dict()
    evals = [
        Job(
            f"eval-{n}",
            {"max_new_tokens": plan.max_new_tokens, "v": 1},
            [m["stage"], "data-test"],
            evaluate_causal,
            dict(
                model_dir=m["dir"], teacher_dir=teacher_dir, test_file=data["test"], plan=plan_dict
            ),
            f"evaluating {n} on the test rows",
            cost=0.5,
        )
        for n, m in models.items()
    ]
    dirs = st.run_jobs(jobs + evals, plan.workers)
    results = {}
    for n in models:
        with open(os.path.join(dirs[f"eval-{n}"], "quality.json")) as f:
            results[n] = json.load(f)

    def speed_fn(out):
        speed = causal_speed({n: m["dir"] for n, m in models.items()}, data["test"], plan)
        atomic_write_json(os.path.join(out, "speed.json"), speed)

    sd = st.run(
        "speed",
        {
            "examples": plan.speed_examples,
            "repeats": plan.speed_repeats,
            "tokens": plan.max_new_tokens,
        },
        [m["stage"] for m in models.values()],
        speed_fn,
        f"measuring the speed of {len(models)} models side by side",
    )
    with open(os.path.join(sd, "speed.json")) as f:
        speed = json.load(f)
    floors = trivial_floors(read_rows(data["train"]), read_rows(data["test"]))
    report = build_causal_report(opts, models, results, speed, data, floors)
    # v2: verdicts need an interval excluding zero
    st.publish_report(
        2,
        [f"eval-{n}" for n in models] + ["speed"],
        lambda out: write_causal_report(report, out),
        opts.output,
    )
    return report
