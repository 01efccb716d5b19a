"""Cross-tokenizer KD and the DistiLLM / TAID losses on the study's translation student (issue 18).

Takes a finished ``lmkd study --task translation`` (``--study``: its teacher, its transfer set with
the teacher's beam outputs, its validation and test splits, its student init ``s025-init`` and its
plan from ``report.json``) and trains, with the study's own rule (``lmkd.study.models.train_student``:
the plan's lr, batch, warm-up and step cap, early stopping on the validation CE against the gold
targets, the best evaluation's weights kept, the study's seed):

  a student with its own, smaller tokenizer -- a BPE vocabulary (``lmkd.models.scratch.train_tokenizer``,
  the study's tokenizer function) of ``--vocab`` tokens (default: half the teacher's) trained on the
  transfer rows' sources and gold targets, and a fresh model of s025-init's shape with that vocabulary:
    xtok-gold     gold targets, no KD                                  (the reference of xtok-*)
    xtok-seqkd    the teacher's beam outputs as targets, no KD (Seq-KD)
    xtok-uld      gold targets + ULD from the teacher through its own tokenizer (kd_loss uld)
    xtok-hybrid   the same with GOLD's hybrid: exact KL on shared token strings + ULD on the rest
                  (kd_loss uld_hybrid)
  the study's own student (s025-init, the teacher's tokenizer):
    gold          gold targets, no KD (the study's baseline; the reference of fkl and xtok-gold)
    fkl           forward-KL word-level KD, exactly the study's Word-KD            (the reference of
    skew-kl       kd_loss skew_kl, skew_alpha 0.1 (DistiLLM's)                      skew-kl and taid)
    taid          kd_loss taid with lmkd's defaults (TAID's: t 0.4 -> 1, adaptive, alpha 5e-4, beta 0.99)

KD variants use the study's kd_alpha and kd_temperature.  Each student is scored on the test rows
with ``lmkd.study.models.evaluate_quality`` (greedy and beam BLEU / chrF, the study's beam and
max_new_tokens), the teacher too (or its scores are read from the study's eval-teacher stage), and
each variant is compared with its reference by ``lmkd.scoring.significance.paired_bootstrap`` on beam BLEU
(1,000 resamples, as the study's report).  The table goes to stdout, ``--results`` (default
benchmarks/results/bench_cross_tokenizer.txt) and ``--output``/results.txt, the figures to the same
names with .json.

Trainings and evaluations run ``--jobs`` at a time, each in a worker process on (cores / jobs)
threads (``lmkd.study.stages.Stages.run_jobs``, as the study), and every stage is cached in
``--output``/stages: the same command resumes where it stopped and a changed setting retrains only
what depends on it.  Each stage's log is ``--output``/logs/NAME.log.

    make demo    # or: lmkd study --task translation --budget quick --output runs/demo
    .venv/bin/python benchmarks/bench_cross_tokenizer.py --study runs/demo --output runs/xtok
    # smoke run on a tiny study (seconds of training; the table goes to /tmp, not benchmarks/results):
    lmkd study --task translation --budget tiny --skip-teacher-check --output /tmp/xtok_tiny
    .venv/bin/python benchmarks/bench_cross_tokenizer.py --study /tmp/xtok_tiny --output /tmp/xtok_bench \\
        --steps 8 --rows 64 --results /tmp/xtok_bench/table.txt
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RESULTS = os.path.join(HERE, "results", "bench_cross_tokenizer.txt")

#: every variant: which student (the study's init with the teacher's tokenizer, or the cross-tokenizer
#: one), which target column, and the KD keys (None: no KD; {} : the study's Word-KD, forward KL)
VARIANTS: dict[str, dict] = {
    "gold": {"student": "same", "target": "target", "kd": None},
    "xtok-gold": {"student": "xtok", "target": "target", "kd": None},
    "xtok-seqkd": {"student": "xtok", "target": "teacher", "kd": None},
    "xtok-uld": {"student": "xtok", "target": "target", "kd": {"kd_loss": "uld"}},
    "xtok-hybrid": {"student": "xtok", "target": "target", "kd": {"kd_loss": "uld_hybrid"}},
    "fkl": {"student": "same", "target": "target", "kd": {}},
    "skew-kl": {
        "student": "same",
        "target": "target",
        "kd": {"kd_loss": "skew_kl", "skew_alpha": 0.1},
    },
    "taid": {"student": "same", "target": "target", "kd": {"kd_loss": "taid"}},
}
#: what each variant is compared with (paired bootstrap on beam BLEU)
REFERENCE = {
    "xtok-seqkd": "xtok-gold",
    "xtok-uld": "xtok-gold",
    "xtok-hybrid": "xtok-gold",
    "skew-kl": "fkl",
    "taid": "fkl",
    "fkl": "gold",
    "xtok-gold": "gold",
}
DESCRIPTION = {
    "xtok-gold": "own tokenizer, gold targets",
    "xtok-seqkd": "own tokenizer, teacher beam targets",
    "xtok-uld": "own tokenizer, gold + ULD",
    "xtok-hybrid": "own tokenizer, gold + ULD/KL hybrid",
    "gold": "teacher's tokenizer, gold targets",
    "fkl": "teacher's tokenizer, gold + forward KL",
    "skew-kl": "teacher's tokenizer, gold + skew KL 0.1",
    "taid": "teacher's tokenizer, gold + TAID",
}


def fail(msg: str) -> None:
    print(f"bench_cross_tokenizer: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# ---- the study's inputs ----------------------------------------------------------------------------


def study_inputs(study: str) -> dict:
    stages = os.path.join(study, "stages")
    paths = {
        "teacher": os.path.join(stages, "teacher"),
        "init": os.path.join(stages, "s025-init"),
        "transfer": os.path.join(stages, "transfer", "transfer.jsonl"),
        "validation": os.path.join(stages, "data-validation", "validation.jsonl"),
        "test": os.path.join(stages, "data-test", "test.jsonl"),
    }
    for path in paths.values():
        if not os.path.exists(path):
            fail(
                f"{path} does not exist: --study takes the output dir of a finished `lmkd study --task "
                "translation` (e.g. `make demo`'s runs/demo)"
            )
    return paths


def study_plan(study: str, budget: str | None) -> tuple[dict, dict, str]:
    """(the study's plan, its report or {}, where the plan came from).  The plan is report.json's; a
    study without one (still running) needs --budget: the budget's table with the study's sized
    lengths and batch (lmkd.study.teachers.fit_batch), kd_alpha 0.5 and temperature 1 (the defaults)."""
    report_path = os.path.join(study, "report.json")
    if os.path.isfile(report_path):
        report = read_json(report_path)
        if report.get("task") != "translation":
            fail(
                f"{report_path} is a {report.get('task')} study; this benchmark takes a translation study"
            )
        return copy.deepcopy(report["plan"]), report, "report.json"
    if budget is None:
        fail(
            f"{report_path} does not exist (is the study finished?); pass --budget BUDGET to rebuild the plan "
            "from the budget's table, if the study ran with no --student-steps/--kd-alpha/--beams overrides"
        )
    from lmkd.study import BUDGETS
    from lmkd.study.teachers import fit_batch

    plan = copy.deepcopy(BUDGETS[budget])
    sizing = read_json(os.path.join(study, "stages", "lengths", "lengths.json"))
    plan.update(
        max_length_cap=plan["max_length"],
        max_length=sizing["max_length"],
        positions=sizing["positions"],
        length_sizing=sizing,
        kd_alpha=0.5,
        kd_temperature=1.0,
        notes=[],
    )
    fit_batch(plan)
    return plan, {}, f"the {budget} budget's table (no report.json)"


def study_seed(init_dir: str, default: int = 42) -> int:
    """The seed the study made its student init with (its students train with it too)."""
    meta = os.path.join(init_dir, "stage.json")
    return int(read_json(meta)["options"].get("seed", default)) if os.path.isfile(meta) else default


#: the variants that are exactly one of the study's own students (same init, rows, plan and seed)
STUDY_STUDENTS = {"gold": "s025-baseline", "fkl": "s025-word-kd"}


def study_student(study: str, variant: str, plan: dict, seed: int) -> tuple[str, str] | None:
    """``(train dir, eval dir)`` of the study's own student that ``variant`` would retrain identically
    (the study's baseline for ``gold``, its Word-KD for ``fkl`` when it ran with --online-kd: same init,
    transfer rows, plan, seed),
    when its stages are there with those settings; None otherwise (the variant is trained here)."""
    name = STUDY_STUDENTS.get(variant)
    if name is None:
        return None
    train, ev = os.path.join(study, "stages", name), os.path.join(study, "stages", f"eval-{name}")
    if not all(
        os.path.isfile(os.path.join(d, f))
        for d, f in (
            (train, "stage.json"),
            (train, "train_log.json"),
            (train, "distill_results.json"),
        )
    ):
        return None
    options = read_json(os.path.join(train, "stage.json")).get("options", {})
    same = (
        options.get("steps") == plan["student_steps"]
        and options.get("seed") == seed
        and options.get("lr") == plan["student_lr"]
        and options.get("batch") == plan["batch_size"]
        and options.get("target") == "target"
        and (
            variant == "gold"
            or (
                options.get("kd_alpha") == plan["kd_alpha"]
                # this benchmark's fkl runs the teacher online, as --online-kd does
                and not options.get("kd_cache")
            )
        )
    )
    return (train, ev) if same and study_teacher_eval(ev, plan) else None


def study_teacher_eval(eval_dir: str, plan: dict) -> bool:
    """Whether the study's eval-teacher stage scored the teacher as this run would (same beam and
    max_new_tokens; the caller checks that the test rows are all of them)."""
    quality, meta = os.path.join(eval_dir, "quality.json"), os.path.join(eval_dir, "stage.json")
    if not (os.path.isfile(quality) and os.path.isfile(meta)):
        return False
    options = read_json(meta).get("options", {})
    return all(options.get(k) == plan[k] for k in ("beams", "max_new_tokens"))


# ---- the stages this benchmark runs ----------------------------------------------------------------


def write_data(
    out: str, transfer: str, validation: str, test: str, rows: int | None, test_rows: int | None
) -> None:
    """train.jsonl (the transfer rows: source, target = gold, teacher = its best beam, inter),
    validation.jsonl and test.jsonl, the first ``rows`` / ``test_rows`` of each when given."""
    from lmkd.core.io import read_rows, write_jsonl

    train = read_rows(transfer)
    missing = {"source", "target", "teacher"} - set(train[0])
    if missing:
        fail(f"{transfer} has no column {sorted(missing)[0]!r}")
    write_jsonl(os.path.join(out, "train.jsonl"), train[:rows] if rows else train)
    write_jsonl(os.path.join(out, "validation.jsonl"), read_rows(validation))
    tests = read_rows(test)
    write_jsonl(os.path.join(out, "test.jsonl"), tests[:test_rows] if test_rows else tests)


def make_tokenizer(out: str, train_file: str, vocab: int) -> None:
    """The cross-tokenizer student's BPE tokenizer: the study's tokenizer function on the training
    rows' sources and gold targets."""
    from lmkd.core.io import read_rows
    from lmkd.models.scratch import train_tokenizer

    rows = read_rows(train_file)
    train_tokenizer(
        [r["source"] for r in rows] + [r["target"] for r in rows], vocab_size=vocab
    ).save_pretrained(out)


def make_xtok_init(out: str, init_dir: str, teacher_dir: str, tok_dir: str, seed: int) -> None:
    """A fresh model of ``init_dir``'s shape with the tokenizer of ``tok_dir``: its config with the new
    vocabulary size and the new tokenizer's ids of the same special tokens, initialised from ``seed``."""
    import torch
    from transformers import AutoConfig

    from lmkd.models.loading import AUTO_CLASS, kind_from_config, load_tokenizer
    from lmkd.study.models import save_model

    tok, old = load_tokenizer(tok_dir), load_tokenizer(teacher_dir)
    config = AutoConfig.from_pretrained(init_dir)
    config.vocab_size = len(tok)
    for key in (
        "pad_token_id",
        "eos_token_id",
        "bos_token_id",
        "decoder_start_token_id",
        "forced_eos_token_id",
    ):
        old_id = getattr(config, key, None)
        if old_id is not None:  # the same special token, by its string, in the new vocabulary
            new_id = tok.convert_tokens_to_ids(old.convert_ids_to_tokens(old_id))
            if new_id is None or new_id == tok.unk_token_id and old_id != old.unk_token_id:
                fail(f"the new tokenizer has no {old.convert_ids_to_tokens(old_id)!r} ({key})")
            setattr(config, key, new_id)
    torch.manual_seed(seed)
    model = AUTO_CLASS[kind_from_config(init_dir)].from_config(config)
    save_model(model, tok, out)


def length_rule(tok_dir: str, train_file: str, plan: dict) -> dict:
    """The study's length rule (lmkd.study.lengths.size_lengths) with the new tokenizer, capped by the
    study's cap and by the init's position table."""
    from lmkd.core.io import read_rows
    from lmkd.models.loading import load_tokenizer
    from lmkd.study.lengths import size_lengths

    cap = plan.get("max_length_cap", plan["max_length"])
    return size_lengths(
        load_tokenizer(tok_dir),
        read_rows(train_file),
        ("source", "target"),
        cap,
        plan["max_new_tokens"],
        limit=plan.get("positions"),
    )


# ---- checks and figures of a trained student -------------------------------------------------------


def weight_change(model_dir: str, init_dir: str) -> float:
    """Largest absolute change of any weight between the init and the trained student."""
    from safetensors.torch import load_file

    a = load_file(os.path.join(model_dir, "model.safetensors"))
    b = load_file(os.path.join(init_dir, "model.safetensors"))
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a.keys() & b.keys())


def elapsed(stage_dir: str) -> float | None:
    meta = os.path.join(stage_dir, "stage.json")
    return read_json(meta).get("elapsed_s") if os.path.isfile(meta) else None


def fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def signed(x: float) -> str:
    return ("+" if x >= 0 else "−") + f"{abs(x):.2f}"


# ---- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--study", required=True, help="output dir of a finished `lmkd study --task translation`"
    )
    ap.add_argument(
        "--output", required=True, help="where the students, stages and logs go (resumable)"
    )
    ap.add_argument(
        "--variants", default="all", help=f"comma list of {', '.join(VARIANTS)} (default: all)"
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="trainings/evaluations at a time, each in its own process "
        "on cores/jobs threads (default 2); 1 runs them one after the other in this process",
    )
    ap.add_argument("--steps", type=int, help="override the plan's student step cap (smoke runs)")
    ap.add_argument(
        "--eval-every", type=int, help="override the plan's validation interval (smoke runs)"
    )
    ap.add_argument("--rows", type=int, help="train on the first N transfer rows only (smoke runs)")
    ap.add_argument(
        "--test-rows", type=int, help="score on the first N test rows only (smoke runs)"
    )
    ap.add_argument(
        "--vocab",
        type=int,
        help="the cross-tokenizer student's vocabulary (default: half the teacher's)",
    )
    ap.add_argument(
        "--seed", type=int, help="training and init seed (default: the study's, from s025-init)"
    )
    ap.add_argument(
        "--budget", help="only for a study with no report.json: rebuild its plan from this budget"
    )
    ap.add_argument(
        "--results",
        default=DEFAULT_RESULTS,
        help="the table (and .json beside it); default benchmarks/results/bench_cross_tokenizer.txt",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = ap.parse_args(argv)

    names = (
        list(VARIANTS)
        if ns.variants == "all"
        else [v.strip() for v in ns.variants.split(",") if v.strip()]
    )
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        fail(
            f"unknown variant {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(VARIANTS)}"
        )
    if ns.jobs < 1:
        fail("--jobs must be >= 1")

    from lmkd.core.io import file_digest
    from lmkd.models.loading import load_tokenizer
    from lmkd.scoring.significance import paired_bootstrap
    from lmkd.study.models import TRAIN_LOG, StoppingRule
    from lmkd.study.plan import thread_options
    from lmkd.study.stages import Job, Stages, threads_per_worker

    inputs = study_inputs(ns.study)
    plan, report, plan_from = study_plan(ns.study, ns.budget)
    plan["workers"], plan["threads_per_worker"] = ns.jobs, threads_per_worker(ns.jobs)
    if ns.steps:
        plan["student_steps"] = ns.steps
    if ns.eval_every:
        plan["eval_every"] = ns.eval_every
    seed = ns.seed if ns.seed is not None else study_seed(inputs["init"])
    teacher_tok = load_tokenizer(inputs["teacher"])
    vocab = ns.vocab or len(teacher_tok) // 2
    stopping = StoppingRule.from_plan(plan)
    xtok_used = any(VARIANTS[v]["student"] == "xtok" for v in names)

    test_limited = bool(ns.test_rows)
    eval_teacher_dir = os.path.join(ns.study, "stages", "eval-teacher")
    teacher_reused = not test_limited and study_teacher_eval(eval_teacher_dir, plan)
    total = (
        3 + (2 if xtok_used else 0) + 2 * len(names) + (0 if teacher_reused else 1)
    )  # (less what is reused)
    os.makedirs(ns.output, exist_ok=True)
    st = Stages(ns.output, total)
    print(
        f"bench_cross_tokenizer: study {ns.study} (plan from {plan_from}), variants {', '.join(names)}, "
        f"{ns.jobs} at a time, output {ns.output}",
        flush=True,
    )
    t_start = time.time()

    teacher_dir = inputs["teacher"]
    st.run(
        "in-teacher",
        {"path": os.path.abspath(teacher_dir), "digest": file_digest(teacher_dir)},
        [],
        lambda out: None,
        "the study's teacher",
    )
    st.run(
        "in-init",
        {"path": os.path.abspath(inputs["init"]), "digest": file_digest(inputs["init"])},
        [],
        lambda out: None,
        "the study's student init (s025-init)",
    )
    data_dir = st.run(
        "data",
        {
            "digests": {k: file_digest(inputs[k]) for k in ("transfer", "validation", "test")},
            "rows": ns.rows,
            "test_rows": ns.test_rows,
        },
        [],
        lambda out: write_data(
            out, inputs["transfer"], inputs["validation"], inputs["test"], ns.rows, ns.test_rows
        ),
        "the transfer, validation and test rows",
    )
    train_file, validation_file, test_file = (
        os.path.join(data_dir, f"{s}.jsonl") for s in ("train", "validation", "test")
    )

    inits = {"same": inputs["init"]}
    xtok: dict = {}
    if xtok_used:
        tok_dir = st.run(
            "xtok-tokenizer",
            {"vocab": vocab},
            ["data"],
            lambda out: make_tokenizer(out, train_file, vocab),
            f"training the student's own {vocab}-token BPE tokenizer on the transfer rows",
        )
        inits["xtok"] = st.run(
            "xtok-init",
            {"seed": seed, "v": 1},
            ["xtok-tokenizer", "in-init", "in-teacher"],
            lambda out: make_xtok_init(out, inputs["init"], teacher_dir, tok_dir, seed),
            "the cross-tokenizer student: s025-init's shape with the new vocabulary",
        )
        from lmkd.teacher.cross_tokenizer import shared_vocabulary

        xtok_tok = load_tokenizer(tok_dir)
        xtok = {
            "vocab": len(xtok_tok),
            "shared_token_strings": int(len(shared_vocabulary(xtok_tok, teacher_tok)[0])),
            "lengths": length_rule(tok_dir, train_file, plan),
        }

    base_opts = {
        "steps": plan["student_steps"],
        "lr": plan["student_lr"],
        "batch": plan["batch_size"],
        "warmup": plan["warmup_steps"],
        "seed": seed,
        "stopping": stopping.options(),
        **thread_options(plan),
    }
    eval_opts = {
        "beams": plan["beams"],
        "max_new_tokens": plan["max_new_tokens"],
        **thread_options(plan),
    }
    jobs: list[Job] = []
    # gold and fkl are the study's baseline and Word-KD students, trained by the same rule on the same rows
    # from the same init with the same seed: read from the study (unless a smoke setting changes them)
    reused = (
        {}
        if (ns.rows or ns.test_rows)
        else {v: d for v in names if (d := study_student(ns.study, v, plan, seed)) is not None}
    )
    for v in names:
        spec = VARIANTS[v]
        if v in reused:
            continue
        vplan = dict(plan)
        if spec["student"] == "xtok":  # the study's length rule, with the student's own tokenizer
            vplan["max_length"] = xtok["lengths"]["max_length"]
        kd = spec["kd"]
        extra = dict(kd or {})
        if kd is not None and spec["student"] == "xtok":
            extra["teacher_tokenizer"] = teacher_dir
        init_stage = "in-init" if spec["student"] == "same" else "xtok-init"
        kwargs = dict(
            init_dir=inits[spec["student"]],
            task="translation",
            train_file=train_file,
            validation_file=validation_file,
            plan=vplan,
            steps=plan["student_steps"],
            lr=plan["student_lr"],
            target_column=spec["target"],
            teacher_dir=teacher_dir if kd is not None else None,
            kd_alpha=plan["kd_alpha"] if kd is not None else 0.0,
            seed=seed,
            stopping=stopping.options(),
            **extra,
        )
        opts = {
            **base_opts,
            "max_length": vplan["max_length"],
            "target": spec["target"],
            **(
                {"kd_alpha": plan["kd_alpha"], "kd_temperature": plan["kd_temperature"], **extra}
                if kd is not None
                else {}
            ),
        }
        deps = [init_stage, "data"] + (["in-teacher"] if kd is not None else [])
        what = (
            f"training {v} ({DESCRIPTION[v]}) until its validation CE stops improving "
            f"(at most {plan['student_steps']} steps)"
        )
        jobs.append(
            Job(
                f"train-{v}",
                opts,
                deps,
                "models:train_student",
                kwargs,
                what,
                cost=2.0 if kd is not None else 1.0,
            )
        )
    models = {v: os.path.join(st.dir, f"train-{v}") for v in names}
    eval_targets = dict(models)
    if not teacher_reused:
        eval_targets["teacher"] = teacher_dir
    for name, model_dir in eval_targets.items():
        if name in reused:
            continue
        jobs.append(
            Job(
                f"eval-{name}",
                eval_opts,
                ["in-teacher" if name == "teacher" else f"train-{name}", "data"],
                "models:evaluate_into",
                dict(
                    model_dir=model_dir,
                    task="translation",
                    test_file=test_file,
                    beams=plan["beams"],
                    max_new_tokens=plan["max_new_tokens"],
                ),
                f"evaluating {name} on the test rows",
                cost=0.5,
            )
        )
    dirs = st.run_jobs(jobs, ns.jobs)
    for v, (train_dir, eval_dir) in reused.items():
        dirs[f"train-{v}"], dirs[f"eval-{v}"] = train_dir, eval_dir
        print(
            f"bench_cross_tokenizer: {v} is the study's {STUDY_STUDENTS[v]} (same settings): read from "
            f"{train_dir}",
            flush=True,
        )

    # ---- the figures ----
    from lmkd.core.io import read_rows

    refs = [str(r["target"]) for r in read_rows(test_file)]
    quality = {v: read_json(os.path.join(dirs[f"eval-{v}"], "quality.json")) for v in names}
    teacher_q = read_json(
        os.path.join(eval_teacher_dir if teacher_reused else dirs["eval-teacher"], "quality.json")
    )
    results: dict = {}
    for v in names:
        d = dirs[f"train-{v}"]
        log = read_json(os.path.join(d, TRAIN_LOG))
        metrics = read_json(os.path.join(d, "distill_results.json"))
        spec = VARIANTS[v]
        q = quality[v]
        kd_eval = metrics.get("eval_loss_kd")
        results[v] = {
            "description": DESCRIPTION[v],
            "student": spec["student"],
            "target": spec["target"],
            "kd": spec["kd"],
            "vocab": len(load_tokenizer(d)),
            "parameters": q["parameters"],
            "steps": log["steps"],
            "stopped_early": log["stopped_early"],
            "best_step": log["best_step"],
            "max_steps": log["max_steps"],
            "best_val_ce": log["best_metric"],
            "eval_loss_kd": kd_eval,
            "max_weight_change": weight_change(d, inits[spec["student"]]),
            "greedy": q["greedy"],
            "beam": q["beam"],
            "train_s": elapsed(d),
            "eval_s": elapsed(dirs[f"eval-{v}"]),
            "train_runtime_s": metrics.get("train_runtime"),
            "truncated": {k: val for k, val in metrics.items() if "truncated" in k},
        }
        problems = []
        if results[v]["max_weight_change"] == 0:
            problems.append("weights unchanged")
        if spec["kd"] is not None and (kd_eval is None or not math.isfinite(kd_eval)):
            problems.append(f"KD term not finite ({kd_eval})")
        results[v]["problems"] = problems
    for v in names:
        ref = REFERENCE.get(v)
        if ref in quality:
            c = paired_bootstrap(
                "bleu", quality[v]["predictions"]["beam"], quality[ref]["predictions"]["beam"], refs
            )
            results[v]["vs_reference"] = {"reference": ref, **c.as_dict()}

    # ---- the table ----
    data_info = report.get("data", {})
    corpus = (
        f"{os.path.basename(data_info['train'])} (test: {os.path.basename(data_info['test'])})"
        if data_info.get("train")
        else "the study's corpus"
    )
    n_train = len(read_rows(train_file))
    lines = [
        f"# benchmarks/bench_cross_tokenizer.py {' '.join(argv)}   ({time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} CPU cores)",
        f"# corpus: {corpus}; {n_train} transfer rows (gold targets and the teacher's beam-{plan['beams']} outputs), "
        f"{len(read_rows(validation_file))} validation rows (early stopping), {len(refs)} test rows",
        f"# teacher: the study's ({report.get('teacher', 'see the study')}), {fmt_params(teacher_q['parameters'])} "
        f"params, vocab {len(teacher_tok)}: BLEU {teacher_q['greedy']['bleu']:.2f} greedy, "
        f"{teacher_q['beam']['bleu']:.2f} beam, chrF {teacher_q['beam']['chrf']:.2f} beam"
        + (" (the study's eval-teacher stage)" if teacher_reused else ""),
        f"# training (every variant, the study's rule, plan from {plan_from}): AdamW lr {plan['student_lr']}, batch "
        f"{plan['batch_size']}, warm-up {min(plan['warmup_steps'], plan['student_steps'] // 3)}, constant rate, "
        f"at most {plan['student_steps']} steps, stopped after {plan['patience']} validations (every "
        f"{plan['eval_every']} steps) without a gain of {plan['min_delta']} in validation CE, best weights kept; "
        f"seed {seed}; KD alpha {plan['kd_alpha']}, temperature {plan['kd_temperature']}; max length "
        f"{plan['max_length']}; beam {plan['beams']}, max {plan['max_new_tokens']} new tokens",
    ]
    if xtok:
        sz = xtok["lengths"]
        lines.append(
            f"# own-tokenizer students: BPE of {xtok['vocab']} tokens (lmkd.models.scratch.train_tokenizer) on the "
            f"{n_train} transfer rows' sources and gold targets; {xtok['shared_token_strings']} token strings "
            f"shared with the teacher's; s025-init's shape, fresh weights (seed {seed}); max length "
            f"{sz['max_length']} by the study's rule ({sz['truncated_rows']} of {sz['rows']} rows truncated)"
        )
    if reused:
        lines.append(
            "# read from the study, not retrained (its own students, by the same rule): "
            + ", ".join(f"{v} = {STUDY_STUDENTS[v]}" for v in reused)
        )
    lines.append(
        f"# {ns.jobs} job(s) at a time, {plan['threads_per_worker'] if ns.jobs > 1 else 'torch default'} "
        "thread(s) each; wall times are per stage (training includes its validation passes)"
    )
    lines += [
        "",
        "| variant | what | vocab | params | steps | BLEU greedy | BLEU beam | chrF beam | "
        "Δ BLEU beam vs reference (95% CI, p) | train wall | s/step¹ | eval wall |",
        "|---|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    lines.append(
        f"| teacher | the study's teacher | {len(teacher_tok)} | {fmt_params(teacher_q['parameters'])} | — | "
        f"{teacher_q['greedy']['bleu']:.2f} | {teacher_q['beam']['bleu']:.2f} | "
        f"{teacher_q['beam']['chrf']:.2f} | — | — | — | — |"
    )
    for v in names:
        r = results[v]
        vs = r.get("vs_reference")
        diff = (
            f"{signed(vs['difference'])} vs {vs['reference']} ({signed(vs['ci_low'])}…{signed(vs['ci_high'])}, "
            f"p = {vs['p_value']:.3f})"
            if vs
            else "—"
        )
        steps = (
            f"{r['steps']}"
            + (" (stopped)" if r["stopped_early"] else " (cap)")
            + (f", best {r['best_step']}" if r["best_step"] is not None else "")
        )
        per_step = (
            r["train_runtime_s"] / r["steps"] if r["train_runtime_s"] and r["steps"] else None
        )
        lines.append(
            f"| {v}{' ⚠' if r['problems'] else ''} | {r['description']} | {r['vocab']} | "
            f"{fmt_params(r['parameters'])} | {steps} | {r['greedy']['bleu']:.2f} | {r['beam']['bleu']:.2f} | "
            f"{r['beam']['chrf']:.2f} | {diff} | {fmt_s(r['train_s'])} | "
            f"{f'{per_step:.3f}' if per_step else '—'} | {fmt_s(r['eval_s'])} |"
        )
    lines.append("")
    lines.append(
        "Δ: paired bootstrap of beam BLEU (lmkd.scoring.significance.paired_bootstrap, 1,000 resamples, sacrebleu's "
        "method) against the reference: xtok-seqkd/uld/hybrid vs xtok-gold, skew-kl and taid vs fkl, fkl and "
        "xtok-gold vs gold. Validation CE (the stopping metric) is per token of each student's own "
        "tokenizer, so it is not compared across vocabularies (it is in the JSON). Train wall: the "
        "training stage (process start, model and data loading included); ¹ the Trainer's train_runtime / "
        "steps (its validation passes included)."
    )
    for v in names:
        if results[v]["problems"]:
            lines.append(f"⚠ {v}: {'; '.join(results[v]['problems'])}")
    lines.append(
        f"Total wall time of this run: {fmt_s(time.time() - t_start)} (cached stages count their own time "
        "above, not here)."
    )
    table = "\n".join(lines) + "\n"
    print("\n" + table, flush=True)

    out_json = {
        "study": os.path.abspath(ns.study),
        "plan_from": plan_from,
        "plan": plan,
        "seed": seed,
        "jobs": ns.jobs,
        "rows": n_train,
        "test_rows": len(refs),
        "xtok": xtok,
        "teacher": {
            "parameters": teacher_q["parameters"],
            "vocab": len(teacher_tok),
            "greedy": teacher_q["greedy"],
            "beam": teacher_q["beam"],
            "reused": teacher_reused,
        },
        "variants": results,
    }
    for path in {
        os.path.abspath(ns.results),
        os.path.abspath(os.path.join(ns.output, "results.txt")),
    }:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(table)
        with open(os.path.splitext(path)[0] + ".json", "w", encoding="utf-8") as f:
            json.dump(out_json, f, indent=1, default=str)
    print(
        f"bench_cross_tokenizer: table in {ns.results}, figures in {os.path.splitext(ns.results)[0]}.json",
        flush=True,
    )
    return 1 if any(results[v]["problems"] for v in names) else 0


if __name__ == "__main__":
    raise SystemExit(main())
