"""run_distill: the body of `lmkd distill` -- load, tokenise, train, save."""

from __future__ import annotations

import json
import os

from .config import DistillationConfig
from .data import DataArguments, collator_for, load_data, mix_gold_targets, tokenize
from . import regimes
from .errors import LmkdError
from .modeling import TASK_KIND, check_model_path, check_same_tokenizer, load_model, load_tokenizer
from .trainer import DistillationTrainer


def _labelled(data_args) -> bool:
    return data_args.target_column is not None and data_args.task not in ("mlm", "causal-lm")


def _raw(path, data_args, limit, mix_seed=None):
    columns = [data_args.source_column] + ([data_args.target_column] if _labelled(data_args) else [])
    mix = _labelled(data_args) and mix_seed is not None and data_args.mix_gold_fraction > 0
    ds = load_data(path, columns + ([data_args.gold_column] if mix else []))
    ds = ds.select(range(min(limit, len(ds)))) if limit is not None else ds
    if mix:  # Seq-KD with a share of gold references (`lmkd generate` output)
        ds = mix_gold_targets(ds, data_args.target_column, data_args.gold_column, data_args.mix_gold_fraction,
                              mix_seed)
    return ds


def run_distill(model_args, data_args: DataArguments, args: DistillationConfig, resume: bool = False,
                teacher_model=None) -> dict:
    """Train ``model_args.student_model_name_or_path`` on ``data_args`` with ``args``; save the
    student and its tokenizer to ``args.output_dir``; return the training metrics.  The regimes of
    lmkd.regimes (transfer sets, ensembles, rounds, cohorts, on-policy KD) are chosen by ``args``."""
    if args.rounds > 1:
        return regimes.run_born_again(model_args, data_args, args, resume=resume, teacher_model=teacher_model)
    eval_data_args = regimes.unlabelled_data_args(data_args, args, evaluation=True)
    data_args = regimes.unlabelled_data_args(data_args, args)
    kind = TASK_KIND[data_args.task]
    # Check everything cheap (files, columns, paths) before loading any model.
    train = _raw(data_args.train_file, data_args, data_args.max_train_samples, mix_seed=args.seed)
    evaluation = _raw(data_args.validation_file, eval_data_args, data_args.max_eval_samples) \
        if data_args.validation_file else None
    transfer = regimes.read_transfer_set(data_args)
    if teacher_model is None and args.teacher_model_name_or_path and args.kd_alpha > 0:
        for path in regimes.teacher_paths(args):
            check_model_path(path)
    check_model_path(model_args.student_model_name_or_path)
    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.student_model_name_or_path)
    if teacher_model is None and not args.teacher_cache and (args.kd_alpha > 0 or regimes._features_on(args)):
        for path in regimes.teacher_paths(args):  # before any model loads or tokenising: one clear error
            check_same_tokenizer(tokenizer, load_tokenizer(path, required=False))
    student = load_model(model_args.student_model_name_or_path, kind=kind)
    teacher_model = teacher_model if teacher_model is not None else regimes.load_teacher(args, student, tokenizer)
    with args.main_process_first(desc="tokenising"):
        labelled = _labelled(data_args)
        train = tokenize(train, tokenizer, data_args, labelled=labelled)
        if evaluation is not None:
            evaluation = tokenize(evaluation, tokenizer, eval_data_args, labelled=_labelled(eval_data_args))
        if transfer is not None:
            train = regimes.add_transfer_set(train, transfer, data_args, tokenizer)
    collator = collator_for(data_args.task, tokenizer, student, data_args.mlm_probability, seed=args.seed)
    collator = regimes.wrap_collator(collator, data_args)
    if (resume and not os.path.isdir(args.output_dir)):
        raise LmkdError(f"--resume: {args.output_dir} has no checkpoint to resume from; run without --resume")
    trainer = regimes.trainer_class(args, data_args)(
        model=student, args=args, teacher_model=teacher_model, train_dataset=train, eval_dataset=evaluation,
        processing_class=tokenizer, data_collator=collator)
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model(args.output_dir)
    metrics = dict(result.metrics)
    if evaluation is not None:
        metrics.update(trainer.evaluate())
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "distill_results.json"), "w") as f:
            json.dump(metrics, f, indent=1, sort_keys=True)
    return metrics
