"""The body of `lmkd distill`: load, tokenise, train, save.

:func:`run_distill` is one run; the regimes of :mod:`lmkd.train.regimes` (transfer sets, ensembles,
cohorts, on-policy KD, and born-again rounds -- a loop of these runs) are chosen by its config, and
what belongs to each regime (its data, its trainer, its loop) lives in that package.
"""

from __future__ import annotations

import copy
import logging
import os

from lmkd.core.constants import CAUSAL, CLASSIFICATION, MLM, SEQ2SEQ, TASK_KIND
from lmkd.core.errors import LmkdError
from lmkd.core.io import atomic_write_json, check_output, nothing_left_on_error
from lmkd.data import chat
from lmkd.data.collators import collator_for
from lmkd.data.dataset import DataArguments
from lmkd.data.reading import mix_gold_targets, read_split
from lmkd.data.tokenizing import tokenize
from lmkd.models.loading import check_model_path, load_config, load_model, load_tokenizer
from lmkd.models.vocabulary import check_same_tokenizer
from lmkd.scoring.metrics import compute_metrics_for
from lmkd.teacher import ensemble, frozen, logit_cache
from lmkd.train import card, regimes
from lmkd.train.card import RESULTS_NAME
from lmkd.train.config import DistillationConfig
from lmkd.train.features import check_layer_maps
from lmkd.train.regimes import born_again

logger = logging.getLogger(__name__)


def _labelled(data_args) -> bool:
    return data_args.target_column is not None and TASK_KIND[data_args.task] not in (MLM, CAUSAL)


def _raw(split, data_args, limit, mix_seed=None):
    mix = _labelled(data_args) and mix_seed is not None and data_args.mix_gold_fraction > 0
    # each column with the key that names it, so a missing one's error says which key to fix
    named = [(data_args.source_column, "--source-column")]
    named += [(data_args.target_column, "--target-column")] if _labelled(data_args) else []
    named += [(data_args.prompt_column, "--prompt-column")] if data_args.prompt_column else []
    named += [(data_args.gold_column, "--gold-column")] if mix else []
    ds = read_split(data_args, split, [c for c, _ in named], [f for _, f in named])
    if ds is None:
        return None
    ds = ds.select(range(min(limit, len(ds)))) if limit is not None else ds
    if mix:  # Seq-KD with a share of gold references (`lmkd generate` output)
        ds = mix_gold_targets(
            ds,
            data_args.target_column,
            data_args.gold_column,
            data_args.mix_gold_fraction,
            mix_seed,
        )
    return ds


def run_distill(
    model_args,
    data_args: DataArguments,
    args: DistillationConfig,
    resume: bool = False,
    teacher_model=None,
    callbacks: list | None = None,
    command: str | None = None,
) -> dict:
    """Train ``model_args.student_model_name_or_path`` on ``data_args`` with ``args``.

    Saves the student and its tokenizer to ``args.output_dir``, with a model card and the run's
    settings (:mod:`lmkd.train.card`).  The regimes of lmkd.train.regimes (transfer sets,
    ensembles, rounds, cohorts, on-policy KD) are chosen by ``args``.  With ``push_to_hub`` the
    student, its card and settings are pushed once they are all written.

    Args:
        model_args: the :class:`lmkd.train.config.ModelArguments` (which student).
        data_args: the data to train (and validate) on.
        args: the run's :class:`DistillationConfig`.
        resume: continue from the last checkpoint in ``args.output_dir``.
        teacher_model: a teacher model object (None: ``args.teacher_model_name_or_path``).
        callbacks: transformers ``TrainerCallback`` objects for the trainer (e.g. the study's
            early stopping); not passed on to born-again rounds.
        command: the command line that ran it, for the model card (None: run from Python).

    Returns:
        The training metrics.

    Raises:
        LmkdError: ``resume`` with no checkpoint to resume from, or a mistake in the settings,
            data or models.
    """
    if resume and not resumable(args.output_dir):
        raise LmkdError(
            f"--resume: {args.output_dir} holds no checkpoint to resume from (the run stopped before its "
            "first save, or saves nothing: save_strategy no); run without --resume to start it again"
        )
    check_output(
        args.output_dir, "output_dir", directory=True
    )  # (the Trainer makes it, its saves write in it)
    if args.rounds > 1:
        return regimes.run_born_again(
            run_distill,
            model_args,
            data_args,
            args,
            resume=resume,
            teacher_model=teacher_model,
            command=command,
        )
    eval_data_args = regimes.unlabelled_data_args(data_args, args, evaluation=True)
    data_args = regimes.unlabelled_data_args(data_args, args)
    kind = TASK_KIND[data_args.task]
    if data_args.prompt_column:
        if kind != CAUSAL or not args.on_policy_fraction > 0:
            raise LmkdError(
                "prompt_column names the prompt a causal LM student continues in on-policy KD: use it "
                "with task causal-lm and on_policy_fraction > 0, or drop it"
            )
        eval_data_args = copy.copy(eval_data_args)
        eval_data_args.prompt_column = None  # evaluation scores the data, it generates nothing
    # Check everything cheap (files, columns, paths) before loading any model.
    train = _raw("train", data_args, data_args.max_train_samples, mix_seed=args.seed)
    evaluation = _raw("validation", eval_data_args, data_args.max_eval_samples)
    transfer = regimes.read_transfer_set(data_args)
    # BLEU/ROUGE (predict_with_generate) or accuracy on the validation set, as `lmkd evaluate` scores them
    scored = (
        evaluation is not None
        and _labelled(eval_data_args)
        and (kind == CLASSIFICATION or (kind == SEQ2SEQ and args.predict_with_generate))
    )
    references = (
        list(evaluation[eval_data_args.target_column]) if scored and kind == SEQ2SEQ else None
    )
    if (
        args.logit_cache
        and args.kd_alpha > 0
        and evaluation is not None
        and not args.eval_logit_cache
    ):
        raise LmkdError(frozen.EVAL_CACHE_NEEDED)
    if teacher_model is None and args.teacher_model_name_or_path and args.kd_alpha > 0:
        for path in frozen.teacher_paths(args):
            check_model_path(path)
    student_paths = regimes.cohort_paths(model_args, args)
    for path in student_paths:
        check_model_path(path)
    tokenizer = load_tokenizer(model_args.tokenizer_name or student_paths[0])
    chat_rows = check_chat_rows(train, evaluation, tokenizer, data_args, args)
    for path in student_paths[1:]:  # a cohort of checkpoints: one vocabulary
        check_same_tokenizer(tokenizer, load_tokenizer(path, required=False))
    if teacher_model is None and not args.logit_cache and (args.kd_alpha > 0 or args.uses_features):
        student_config = load_config(student_paths[0])
        if args.teacher_tokenizer:
            frozen.check_cross_tokenizer_kind(kind)
        for path in frozen.teacher_paths(
            args
        ):  # before any model loads or tokenising: one clear error
            if args.teacher_tokenizer:
                load_tokenizer(args.teacher_tokenizer)  # one clear error when it is missing
            else:
                check_same_tokenizer(tokenizer, load_tokenizer(path, required=False))
            teacher_config = load_config(path)
            frozen.check_teacher_kind(teacher_config, kind, path)
            check_layer_maps(args, kind, student_config, teacher_config)
    student = (
        regimes.load_cohort(student_paths, kind, args)
        if args.cohort_size > 1
        else load_model(student_paths[0], kind=kind)
    )
    teacher_model = (
        teacher_model
        if teacher_model is not None
        else ensemble.load_teacher(args, student, tokenizer)
    )
    readers = data_readers(args, student, teacher_model)
    notes: dict[str, list] = {"train": [], "validation": [], "transfer": []}
    with args.main_process_first(desc="tokenising"):
        labelled = _labelled(data_args)
        train = tokenize(
            train, tokenizer, data_args, labelled=labelled, model=readers, notes=notes["train"]
        )
        if evaluation is not None:
            evaluation = tokenize(
                evaluation,
                tokenizer,
                eval_data_args,
                labelled=_labelled(eval_data_args),
                model=readers,
                notes=notes["validation"],
            )
        if transfer is not None:
            train = regimes.add_transfer_set(
                train, transfer, data_args, tokenizer, model=readers, notes=notes["transfer"]
            )
    collator = collator_for(
        data_args.task, tokenizer, student, data_args.mlm_probability, seed=args.seed
    )
    collator = regimes.wrap_collator(
        collator, data_args, prompt_lengths=chat_rows and args.on_policy_fraction > 0
    )
    with nothing_left_on_error(
        args.output_dir
    ):  # (the regime trainers check more after the Trainer made it)
        trainer = regimes.trainer_class(args, data_args)(
            model=student,
            args=args,
            teacher_model=teacher_model,
            train_dataset=train,
            eval_dataset=evaluation,
            processing_class=tokenizer,
            data_collator=collator,
            callbacks=callbacks,
            compute_metrics=compute_metrics_for(data_args.task, tokenizer, references)
            if scored
            else None,
        )
    rows = {"train": len(train)} | (
        {"validation": len(evaluation)} if evaluation is not None else {}
    )
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model(
        args.output_dir, _internal_call=True
    )  # pushed below, once the card is written
    metrics = dict(result.metrics)
    if evaluation is not None:
        metrics.update(trainer.evaluate())
    metrics.update(truncation_metrics(notes))
    if trainer.is_world_process_zero():
        atomic_write_json(
            os.path.join(args.output_dir, RESULTS_NAME), metrics, indent=1, sort_keys=True
        )
        card.write_card(
            args.output_dir,
            model_args,
            data_args,
            args,
            metrics,
            rows=rows,
            steps=trainer.state.global_step,
            command=command,
            teacher="a model passed from Python"
            if teacher_model is not None and not args.teacher_model_name_or_path
            else None,
        )
    if (
        args.push_to_hub
    ):  # the Trainer's own push (hub_model_id, hub_token, ...); it keeps lmkd's card
        trainer.push_to_hub(commit_message="End of training")
    return metrics


def check_chat_rows(train, evaluation, tokenizer, data_args, args) -> bool:
    """Whether the training rows are chat or prompt/completion rows (:mod:`lmkd.data.chat`),
    checked before any model loads: a template for them, and no cross-tokenizer teacher.

    Args:
        train: the training rows.
        evaluation: the evaluation rows (or None).
        tokenizer: the student's tokenizer.
        data_args: the data arguments.
        args: the run's :class:`DistillationConfig`.

    Returns:
        True for chat or prompt/completion rows.

    Raises:
        LmkdError: chat rows and no chat template, or with ``teacher_tokenizer``.
    """
    found = False
    for ds in (train, evaluation):
        if ds is not None and chat.row_format(ds.features, data_args) != chat.TEXT:
            chat.check_chat_data(ds.features, tokenizer, data_args)
            found = True
    if found and args.teacher_tokenizer:
        raise LmkdError(
            "teacher_tokenizer (cross-tokenizer KD) with chat or prompt/completion rows: the "
            "teacher would read the student's chat template as plain text, not its own; distil "
            "chat data from a teacher with the student's tokenizer (docs/chat-data.md)"
        )
    return found


def resumable(output_dir: str) -> bool:
    """Whether ``--resume`` has something to continue in ``output_dir``: a ``checkpoint-N`` (what the
    Trainer resumes from), or -- born-again rounds -- a ``round-r`` that finished or holds one
    (:func:`lmkd.train.regimes.born_again.rounds_to_resume`).

    Args:
        output_dir: the run's output directory.

    Returns:
        True when there is something to resume.
    """
    return born_again.has_checkpoint(output_dir) or born_again.rounds_to_resume(output_dir)


def truncation_metrics(notes: dict[str, list]) -> dict[str, int]:
    """Flat metrics of the rows the truncation rule cut, per split (train, validation, transfer)
    and part (inputs, targets).

    Args:
        notes: split -> the truncation notes of its parts (``what``, ``truncated``, ``length``).

    Returns:
        ``train_inputs_truncated`` (rows) and ``train_inputs_truncated_to`` (tokens; absent when
        nothing limits the length), and so on for each split and part.
    """
    out = {}
    for split, ns in notes.items():
        for n in ns:
            out[f"{split}_{n['what']}_truncated"] = n["truncated"]
            if n["length"] is not None:
                out[f"{split}_{n['what']}_truncated_to"] = n["length"]
    return out


def data_readers(args, student, teacher_model=None) -> list:
    """Every model that reads the training data, so the one truncation rule
    (:func:`lmkd.models.truncation.fit_length`) fits the data to the smallest of their position
    tables: the student, the live teacher(s) when they are used, and the teacher a logit cache was
    made with.

    Args:
        args: the run's :class:`DistillationConfig`.
        student: the student (model or path).
        teacher_model: a teacher model object given from Python.

    Returns:
        The models (objects or paths).
    """
    readers = [student]
    if teacher_model is not None:
        readers.append(teacher_model)
    elif args.logit_cache:
        made_with = logit_cache.cache_teacher(args.logit_cache)
        readers += [made_with] if made_with else []
    elif args.teacher_model_name_or_path and (args.kd_alpha > 0 or args.uses_features):
        readers += frozen.teacher_paths(args)
    return readers
