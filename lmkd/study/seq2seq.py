"""The seq2seq study (translation, summarization) -- Kim & Rush (2016)'s table:

    transfer rows -> transfer set (teacher beam outputs + n-best, Seq-Inter choice)
    -> student init (one per size and seed, saved once, copied by every variant)
    -> baseline | word-kd | seq-kd | seq-kd+word-kd | seq-inter   (one stage each, per seed;
       each trained until its validation CE stops improving, within the budget's cap)
"""

from __future__ import annotations

import os
import shutil

from ..io import atomic_write_json, read_rows, write_jsonl
from .models import TRAIN_LOG, StoppingRule, save_model, train_student
from .plan import SEQ2SEQ_VARIANTS, StudyOptions, seeded, size_name, student_seeds, thread_options
from .splits import select_transfer_rows
from .stages import Job, Stages

#: the column each variant trains on: the gold target, the teacher's best beam, or Seq-Inter's pick
VARIANT_TARGET = {"baseline": "target", "word-kd": "target", "seq-kd": "teacher", "seq-kd+word-kd": "teacher",
                  "seq-inter": "inter"}


def make_transfer_set(teacher_dir: str, data_file: str, out: str, beams: int, max_new_tokens: int,
                      max_length: int) -> str:
    """The teacher's beam-search n-best on ``data_file`` (:func:`lmkd.seqkd.generate_pseudo_targets`)
    plus the Seq-Inter choice (:func:`lmkd.seqkd.seq_inter_select`); returns the JSONL path with
    columns source, target (gold), teacher (best beam), inter (closest to the gold of the n-best)."""
    from ..seqkd import JSONL_FILE, generate_pseudo_targets, seq_inter_select

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


def _student_init(teacher_dir: str, fraction: float, seed: int, out: str) -> None:
    """The largest student within ``fraction`` of the teacher's parameters: copied teacher layers
    when they fit (shrink-and-fine-tune), else a fresh, narrower model of the teacher's shape."""
    import torch

    from ..modeling import AUTO_CLASS, load_model, load_tokenizer, model_kind
    from ..student import copied_layers_within, make_student, scaled_student_config

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


def seq2seq_students(st: Stages, opts: StudyOptions, data: dict, teacher_dir: str) -> dict[str, dict]:
    """The transfer-set stages, then every variant of every student size and seed; returns the
    students as ``{stage name: {"dir", "stage", "variant", "size", "seed", "train_log"}}``
    (``data["transfer_rows"]`` is set).  The teacher and the transfer set are shared by all seeds;
    each seed has its own init (shared by that seed's variants) and data order.  Every student
    stops on its validation plateau (:class:`~lmkd.study.models.StoppingRule`), ``student_steps``
    being the cap."""
    plan = opts.plan
    rows_dir = st.run("transfer-rows", {"rows": plan["transfer_rows"], "seed": opts.seed}, ["data-train"],
                      lambda out: select_transfer_rows(data["train"], plan["transfer_rows"], opts.seed, out),
                      "choosing the transfer set (the rows every student learns from)")
    rows_file = data["transfer_rows"] = os.path.join(rows_dir, "transfer.jsonl")
    gen_opts = {"beams": plan["beams"], "max_new_tokens": plan["max_new_tokens"]}

    def transfer_fn(out):
        make_transfer_set(teacher_dir, rows_file, out, plan["beams"], plan["max_new_tokens"], plan["max_length"])

    transfer_dir = st.run("transfer", gen_opts, ["teacher", "transfer-rows"], transfer_fn,
                          f"teacher beam search (beam {plan['beams']}) on the transfer set")
    transfer_file = os.path.join(transfer_dir, "transfer.jsonl")

    students: dict[str, dict] = {}
    stopping = StoppingRule.from_plan(plan)
    kd = {"kd_alpha": plan["kd_alpha"], "kd_temperature": plan["kd_temperature"]}
    jobs: list[Job] = []
    for fraction in opts.student_sizes:
        size = size_name(fraction)
        for seed in student_seeds(opts):
            init = seeded(f"{size}-init", opts, seed)
            init_dir = st.run(init, {"fraction": fraction, "seed": seed, "rule": "copy-if-fits"},
                              ["teacher"], lambda out, fraction=fraction, seed=seed: _student_init(
                                  teacher_dir, fraction, seed, out),
                              f"the student init with <= {fraction:g} of the teacher's parameters (seed {seed})")
            student_opts = {"steps": plan["student_steps"], "lr": plan["student_lr"], "batch": plan["batch_size"],
                            "warmup": plan["warmup_steps"], "max_length": plan["max_length"], "seed": seed,
                            "stopping": stopping.options(), **thread_options(plan)}
            for variant in SEQ2SEQ_VARIANTS:
                word = "word-kd" in variant
                target = VARIANT_TARGET[variant]
                data_file = rows_file if target == "target" else transfer_file
                deps = [init, "data-validation"] + (["transfer"] if target != "target" else ["transfer-rows"]) + \
                    (["teacher"] if word else [])
                kwargs = dict(init_dir=init_dir, task=opts.task, train_file=data_file,
                              validation_file=data["validation"], plan=plan, steps=plan["student_steps"],
                              lr=plan["student_lr"], target_column=target, teacher_dir=teacher_dir if word else None,
                              kd_alpha=plan["kd_alpha"] if word else 0.0, seed=seed, stopping=stopping.options())
                name = seeded(f"{size}-{variant}", opts, seed)
                what = (f"training student {variant} (seed {seed}): targets = {target}"
                        + (f", word-level KD alpha {plan['kd_alpha']}" if word else "")
                        + f", until its validation CE stops improving (at most {plan['student_steps']} steps)")
                # a Word-KD step also runs the teacher: about twice a plain one
                jobs.append(Job(name, {**student_opts, "target": target, **(kd if word else {})}, deps,
                                "models:train_student", kwargs, what, cost=2.0 if word else 1.0))
                students[name] = {"stage": name, "variant": variant, "size": fraction, "seed": seed}
    dirs = st.run_jobs(jobs, plan.get("workers", 1))
    for name, m in students.items():
        m["dir"] = dirs[name]
        m["train_log"] = os.path.join(dirs[name], TRAIN_LOG)
    return students
