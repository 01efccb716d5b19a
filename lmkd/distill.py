"""run_distill: the body of `lmkd distill` -- load, tokenise, train, save."""

from __future__ import annotations

import json
import os

from .config import DistillationConfig
from .data import DataArguments, collator_for, load_data, tokenize
from .errors import LmkdError
from .modeling import TASK_KIND, check_model_path, load_model, load_tokenizer
from .trainer import DistillationTrainer


def _labelled(data_args) -> bool:
    return data_args.target_column is not None and data_args.task not in ("mlm", "causal-lm")


def _raw(path, data_args, limit):
    columns = [data_args.source_column] + ([data_args.target_column] if _labelled(data_args) else [])
    ds = load_data(path, columns)
    return ds.select(range(min(limit, len(ds)))) if limit is not None else ds


def run_distill(model_args, data_args: DataArguments, args: DistillationConfig, resume: bool = False,
                teacher_model=None) -> dict:
    """Train ``model_args.student_model_name_or_path`` on ``data_args`` with ``args``; save the
    student and its tokenizer to ``args.output_dir``; return the training metrics."""
    kind = TASK_KIND[data_args.task]
    # Check everything cheap (files, columns, paths) before loading any model.
    train = _raw(data_args.train_file, data_args, data_args.max_train_samples)
    evaluation = _raw(data_args.validation_file, data_args, data_args.max_eval_samples) \
        if data_args.validation_file else None
    if teacher_model is None and args.teacher_model_name_or_path and args.kd_alpha > 0:
        check_model_path(args.teacher_model_name_or_path)
    check_model_path(model_args.student_model_name_or_path)
    tokenizer = load_tokenizer(model_args.tokenizer_name or model_args.student_model_name_or_path)
    student = load_model(model_args.student_model_name_or_path, kind=kind)
    with args.main_process_first(desc="tokenising"):
        labelled = _labelled(data_args)
        train = tokenize(train, tokenizer, data_args, labelled=labelled)
        if evaluation is not None:
            evaluation = tokenize(evaluation, tokenizer, data_args, labelled=labelled)
    collator = collator_for(data_args.task, tokenizer, student, data_args.mlm_probability, seed=args.seed)
    if (resume and not os.path.isdir(args.output_dir)):
        raise LmkdError(f"--resume: {args.output_dir} has no checkpoint to resume from; run without --resume")
    trainer = DistillationTrainer(model=student, args=args, teacher_model=teacher_model, train_dataset=train,
                                  eval_dataset=evaluation, processing_class=tokenizer, data_collator=collator)
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model(args.output_dir)
    metrics = dict(result.metrics)
    if evaluation is not None:
        metrics.update(trainer.evaluate())
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "distill_results.json"), "w") as f:
            json.dump(metrics, f, indent=1, sort_keys=True)
    return metrics
