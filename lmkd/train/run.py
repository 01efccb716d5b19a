"""The body of `lmkd distill`: load, tokenise, train, save -- and the drivers around whole runs.

* :func:`run_distill` -- one run; the regimes of :mod:`lmkd.train.regimes` (transfer sets, ensembles,
  cohorts, on-policy KD) are chosen by its config;
* :func:`run_born_again` -- ``rounds: N``, N runs in turn, each student the next one's teacher;
* the data side of transfer sets: :func:`unlabelled_data_args`, :func:`read_transfer_set`,
  :func:`add_transfer_set` (the collator that reads their flag is :class:`lmkd.train.regimes.TransferCollator`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil

import datasets

from lmkd.train import card, regimes
from lmkd.teacher import logit_cache, frozen
from lmkd.train.config import DistillationConfig
from lmkd.core.constants import CAUSAL, CLASSIFICATION, IGNORE_INDEX, MLM, SEQ2SEQ, TASK_KIND
from lmkd.data.dataset import PROMPT_LENGTH, DataArguments, collator_for, load_data, mix_gold_targets, read_split, tokenize
from lmkd.core.errors import LmkdError
from lmkd.core.io import atomic_write_json, check_output, nothing_left_on_error
from lmkd.train.features import check_layer_maps
from lmkd.scoring.metrics import compute_metrics_for
from lmkd.models.loading import check_model_path, check_same_tokenizer, load_config, load_model, load_tokenizer
from lmkd.train.regimes import LABELLED

logger = logging.getLogger(__name__)

#: what each run writes next to the student: its training (and evaluation) metrics
RESULTS_NAME = "distill_results.json"


def _labelled(data_args) -> bool:
    return data_args.target_column is not None and TASK_KIND[data_args.task] not in (MLM, CAUSAL)


def _raw(split, data_args, limit, mix_seed=None):
    mix = _labelled(data_args) and mix_seed is not None and data_args.mix_gold_fraction > 0
    # each column with the key that names it, so a missing one's error says which key to fix
    named = [(data_args.source_column, "--source_column")]
    named += [(data_args.target_column, "--target_column")] if _labelled(data_args) else []
    named += [(data_args.prompt_column, "--prompt_column")] if data_args.prompt_column else []
    named += [(data_args.gold_column, "--gold_column")] if mix else []
    ds = read_split(data_args, split, [c for c, _ in named], [f for _, f in named])
    if ds is None:
        return None
    ds = ds.select(range(min(limit, len(ds)))) if limit is not None else ds
    if mix:  # Seq-KD with a share of gold references (`lmkd generate` output)
        ds = mix_gold_targets(ds, data_args.target_column, data_args.gold_column, data_args.mix_gold_fraction,
                              mix_seed)
    return ds


def run_distill(model_args, data_args: DataArguments, args: DistillationConfig, resume: bool = False,
                teacher_model=None, callbacks: list | None = None, command: str | None = None) -> dict:
    """Train ``model_args.student_model_name_or_path`` on ``data_args`` with ``args``; save the
    student and its tokenizer to ``args.output_dir``, with a model card and the run's settings
    (:mod:`lmkd.train.card`); return the training metrics.  The regimes of lmkd.train.regimes (transfer sets,
    ensembles, rounds, cohorts, on-policy KD) are chosen by ``args``.
    ``callbacks``: transformers ``TrainerCallback`` objects for the trainer (e.g. the study's early
    stopping); not passed on to born-again rounds.  ``command``: the command line that ran it,
    for the model card (None: run from Python).  With ``push_to_hub`` the student, its card and
    settings are pushed once they are all written."""
    if resume and not resumable(args.output_dir):
        raise LmkdError(f"--resume: {args.output_dir} holds no checkpoint to resume from (the run stopped before its "
                        "first save, or saves nothing: save_strategy no); run without --resume to start it again")
    check_output(args.output_dir, "output_dir", directory=True)  # (the Trainer makes it, its saves write in it)
    if args.rounds > 1:
        return run_born_again(model_args, data_args, args, resume=resume, teacher_model=teacher_model,
                              command=command)
    eval_data_args = unlabelled_data_args(data_args, args, evaluation=True)
    data_args = unlabelled_data_args(data_args, args)
    kind = TASK_KIND[data_args.task]
    if data_args.prompt_column:
        if kind != CAUSAL or not args.on_policy_fraction > 0:
            raise LmkdError("prompt_column names the prompt a causal LM student continues in on-policy KD: use it "
                            "with task causal-lm and on_policy_fraction > 0, or drop it")
        eval_data_args = copy.copy(eval_data_args)
        eval_data_args.prompt_column = None  # evaluation scores the data, it generates nothing
    # Check everything cheap (files, columns, paths) before loading any model.
    train = _raw("train", data_args, data_args.max_train_samples, mix_seed=args.seed)
    evaluation = _raw("validation", eval_data_args, data_args.max_eval_samples)
    transfer = read_transfer_set(data_args)
    # BLEU/ROUGE (predict_with_generate) or accuracy on the validation set, as `lmkd evaluate` scores them
    scored = evaluation is not None and _labelled(eval_data_args) and (kind == CLASSIFICATION or (
        kind == SEQ2SEQ and args.predict_with_generate))
    references = list(evaluation[eval_data_args.target_column]) if scored and kind == SEQ2SEQ else None
    if args.logit_cache and args.kd_alpha > 0 and evaluation is not None and not args.eval_logit_cache:
        raise LmkdError(frozen.EVAL_CACHE_NEEDED)
    if teacher_model is None and args.teacher_model_name_or_path and args.kd_alpha > 0:
        for path in frozen.teacher_paths(args):
            check_model_path(path)
    student_paths = cohort_paths(model_args, args)
    for path in student_paths:
        check_model_path(path)
    tokenizer = load_tokenizer(model_args.tokenizer_name or student_paths[0])
    for path in student_paths[1:]:  # a cohort of checkpoints: one vocabulary
        check_same_tokenizer(tokenizer, load_tokenizer(path, required=False))
    if teacher_model is None and not args.logit_cache and (args.kd_alpha > 0 or args.uses_features):
        student_config = load_config(student_paths[0])
        if args.teacher_tokenizer:
            frozen.check_cross_tokenizer_kind(kind)
        for path in frozen.teacher_paths(args):  # before any model loads or tokenising: one clear error
            if args.teacher_tokenizer:
                load_tokenizer(args.teacher_tokenizer)  # one clear error when it is missing
            else:
                check_same_tokenizer(tokenizer, load_tokenizer(path, required=False))
            teacher_config = load_config(path)
            frozen.check_teacher_kind(teacher_config, kind, path)
            check_layer_maps(args, kind, student_config, teacher_config)
    student = (load_cohort(student_paths, kind, args) if args.cohort_size > 1
               else load_model(student_paths[0], kind=kind))
    teacher_model = teacher_model if teacher_model is not None else frozen.load_teacher(args, student, tokenizer)
    readers = data_readers(args, student, teacher_model)
    notes: dict[str, list] = {"train": [], "validation": [], "transfer": []}
    with args.main_process_first(desc="tokenising"):
        labelled = _labelled(data_args)
        train = tokenize(train, tokenizer, data_args, labelled=labelled, model=readers, notes=notes["train"])
        if evaluation is not None:
            evaluation = tokenize(evaluation, tokenizer, eval_data_args, labelled=_labelled(eval_data_args),
                                  model=readers, notes=notes["validation"])
        if transfer is not None:
            train = add_transfer_set(train, transfer, data_args, tokenizer, model=readers, notes=notes["transfer"])
    collator = collator_for(data_args.task, tokenizer, student, data_args.mlm_probability, seed=args.seed)
    collator = regimes.wrap_collator(collator, data_args)
    with nothing_left_on_error(args.output_dir):  # (the regime trainers check more after the Trainer made it)
        trainer = regimes.trainer_class(args, data_args)(
            model=student, args=args, teacher_model=teacher_model, train_dataset=train, eval_dataset=evaluation,
            processing_class=tokenizer, data_collator=collator, callbacks=callbacks,
            compute_metrics=compute_metrics_for(data_args.task, tokenizer, references) if scored else None)
    rows = {"train": len(train)} | ({"validation": len(evaluation)} if evaluation is not None else {})
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model(args.output_dir, _internal_call=True)  # pushed below, once the card is written
    metrics = dict(result.metrics)
    if evaluation is not None:
        metrics.update(trainer.evaluate())
    metrics.update(truncation_metrics(notes))
    if trainer.is_world_process_zero():
        atomic_write_json(os.path.join(args.output_dir, RESULTS_NAME), metrics, indent=1, sort_keys=True)
        card.write_card(args.output_dir, model_args, data_args, args, metrics, rows=rows,
                        steps=trainer.state.global_step, command=command,
                        teacher="a model passed from Python" if teacher_model is not None and
                        not args.teacher_model_name_or_path else None)
    if args.push_to_hub:  # the Trainer's own push (hub_model_id, hub_token, ...); it keeps lmkd's card
        trainer.push_to_hub(commit_message="End of training")
    return metrics


def resumable(output_dir: str) -> bool:
    """Whether ``--resume`` has something to continue in ``output_dir``: a ``checkpoint-N`` (what the
    Trainer resumes from), or -- born-again rounds -- a ``round-r`` that finished or holds one."""
    from transformers.trainer_utils import get_last_checkpoint

    if not os.path.isdir(output_dir):
        return False
    if get_last_checkpoint(output_dir):
        return True
    rounds = [os.path.join(output_dir, n) for n in os.listdir(output_dir) if n.startswith("round-")]
    return any(os.path.isdir(r) and (os.path.isfile(os.path.join(r, RESULTS_NAME)) or get_last_checkpoint(r))
               for r in rounds)


def truncation_metrics(notes: dict[str, list]) -> dict[str, int]:
    """Flat metrics of the rows the truncation rule cut, per split (train, validation, transfer)
    and part (inputs, targets): ``train_inputs_truncated`` (rows) and ``train_inputs_truncated_to``
    (tokens; absent when nothing limits the length)."""
    out = {}
    for split, ns in notes.items():
        for n in ns:
            out[f"{split}_{n['what']}_truncated"] = n["truncated"]
            if n["length"] is not None:
                out[f"{split}_{n['what']}_truncated_to"] = n["length"]
    return out


def data_readers(args, student, teacher_model=None) -> list:
    """Every model that reads the training data, so the one truncation rule
    (:func:`lmkd.models.truncation.fit_length`) fits the data to the smallest of their position tables: the
    student, the live teacher(s) when they are used, and the teacher a logit cache was made with."""
    readers = [student]
    if teacher_model is not None:
        readers.append(teacher_model)
    elif args.logit_cache:
        made_with = logit_cache.cache_teacher(args.logit_cache)
        readers += [made_with] if made_with else []
    elif args.teacher_model_name_or_path and (args.kd_alpha > 0 or args.uses_features):
        readers += frozen.teacher_paths(args)
    return readers


# ---- co-distillation cohorts ---------------------------------------------------------------------


def cohort_paths(model_args, args) -> list[str]:
    """The student checkpoints of a run: one, or -- co-distillation -- one per cohort member
    (``student_model_name_or_path: a,b,c`` with ``cohort_size: 3``) or one for all of them."""
    paths = [p.strip() for p in str(model_args.student_model_name_or_path).split(",") if p.strip()]
    if not paths:
        raise LmkdError("student_model_name_or_path is empty; name the student checkpoint")
    if len(paths) > 1 and args.cohort_size != len(paths):
        raise LmkdError(f"student_model_name_or_path names {len(paths)} students: that is a co-distillation cohort, "
                        f"set cohort_size {len(paths)} (or name one student)")
    return paths


def load_cohort(paths: list[str], kind: str, args) -> regimes.CohortModel:
    """The members of a co-distillation cohort: each from its own checkpoint, or -- one path for
    all -- K loads of it, member k under seed ``seed + k`` so that weights the checkpoint lacks
    (a new classification head) start differently.  A cohort that cannot differ is refused
    (:func:`lmkd.train.regimes.check_cohort_can_differ`)."""
    import torch

    members = []
    for k in range(args.cohort_size):
        torch.manual_seed(args.seed + k)
        members.append(load_model(paths[k] if len(paths) > 1 else paths[0], kind=kind))
    torch.manual_seed(args.seed)
    logger.info("co-distillation cohort of %d: %s", len(members),
                ", ".join(paths) if len(paths) > 1 else f"{len(members)} loads of {paths[0]} (seeds {args.seed}.."
                f"{args.seed + len(members) - 1} for weights it lacks)")
    return regimes.CohortModel(members)


# ---- born-again networks -------------------------------------------------------------------------


def run_born_again(model_args, data_args, args, resume: bool = False, teacher_model=None,
                   command: str | None = None) -> dict:
    """``rounds: N``: N runs of ``lmkd distill``, each from the same student init; round 1 learns
    from the given teacher (or, with none, from the labels alone -- the born-again "teacher"
    generation), round r > 1 from round r-1's student.  Round r writes ``output_dir/round-r``
    (trained student, tokenizer, metrics; evaluated on validation_file when given); the last
    round's student is also copied into ``output_dir``, with a card and settings of the whole run
    (each round's own are in its directory).  With ``--resume`` finished rounds are kept and the
    interrupted one resumes from its last checkpoint."""
    rounds, per_round = args.rounds, {}
    previous, metrics = None, {}
    for r in range(1, rounds + 1):
        out = os.path.join(args.output_dir, f"round-{r}")
        a = copy.copy(args)
        a.output_dir, a.rounds = out, 1
        if r > 1:
            a.teacher_model_name_or_path, a.teacher_weights, a.logit_cache = previous, None, None
        elif teacher_model is None and not args.teacher_model_name_or_path and not args.logit_cache:
            logger.info("born-again round 1 has no teacher: it trains on the labels alone (kd_alpha 0)")
            a.kd_alpha, a.hidden_weight, a.attention_weight, a.relation_weight = 0.0, 0.0, 0.0, 0.0
        done = os.path.join(out, RESULTS_NAME)
        if resume and os.path.isfile(done):
            with open(done) as f:
                metrics = json.load(f)
            logger.info("born-again round %d/%d already finished in %s", r, rounds, out)
        else:
            logger.info("born-again round %d/%d -> %s (teacher: %s)", r, rounds, out,
                        "given model" if r == 1 and teacher_model is not None else a.teacher_model_name_or_path
                        if a.kd_alpha > 0 else "none")
            metrics = run_distill(model_args, data_args, a, resume=resume and resumable(out),
                                  teacher_model=teacher_model if r == 1 else None, command=command)
        per_round[f"round-{r}"] = metrics
        previous = out
    final = dict(metrics)
    final["rounds"] = per_round
    if args.should_save:
        for name in os.listdir(previous):
            src = os.path.join(previous, name)
            if os.path.isfile(src) and name != RESULTS_NAME:
                shutil.copy2(src, os.path.join(args.output_dir, name))
        atomic_write_json(os.path.join(args.output_dir, RESULTS_NAME), final, indent=1, sort_keys=True)
        card.write_card(args.output_dir, model_args, data_args, args, metrics, command=command,
                        teacher="a model passed from Python" if teacher_model is not None and
                        not args.teacher_model_name_or_path else None)
    return final


# ---- unlabelled transfer sets: the data side -----------------------------------------------------


def unlabelled_data_args(data_args, args, evaluation: bool = False):
    """``data_args`` with no label column when the run never uses one, so none is read (and the
    data needs none): a classification run with ``kd_alpha: 1`` is supervised by the teacher alone;
    a seq2seq run with ``on_policy_fraction: 1`` trains only on the student's own outputs (its
    training data are inputs alone; the validation data keep their targets, ``evaluation=True``).
    Other runs are returned as they are: causal-lm and mlm read no label column anyway, and a
    seq2seq student trained off-policy needs target tokens (``lmkd generate`` makes them)."""
    kind = TASK_KIND[data_args.task]
    drop = (kind == CLASSIFICATION and args.kd_alpha == 1) or (
        kind == SEQ2SEQ and args.on_policy_fraction == 1 and not evaluation)
    if drop and data_args.target_column:
        data_args = copy.copy(data_args)
        data_args.target_column = None
    return data_args


def read_transfer_set(data_args) -> datasets.Dataset | None:
    """The source column (and nothing else) of ``data_args.transfer_file``, or None without one."""
    if not data_args.transfer_file:
        return None
    if TASK_KIND[data_args.task] == SEQ2SEQ:
        raise LmkdError("transfer_file: a seq2seq student cannot train without target tokens; give the transfer "
                        "set the teacher's outputs with `lmkd generate --teacher T --data FILE --output DIR` and "
                        "train on DIR (target_column teacher_target), or train on it alone with on_policy_fraction 1")
    return load_data(data_args.transfer_file, [data_args.source_column]).select_columns([data_args.source_column])


def add_transfer_set(train: datasets.Dataset, raw: datasets.Dataset, data_args, tokenizer, model=None,
                     notes: list | None = None) -> datasets.Dataset:
    """``train`` (tokenised) plus the tokenised rows of ``raw`` (:func:`read_transfer_set`), each
    tagged with :data:`lmkd.train.regimes.LABELLED` (1 for ``train``, 0 for the transfer set).  The
    Trainer's shuffling sampler interleaves the two."""
    kind = TASK_KIND[data_args.task]
    plain = copy.copy(data_args)
    plain.prompt_column = None  # a transfer set has no prompt column: its rows use on_policy_prompt_tokens
    extra = tokenize(raw, tokenizer, plain, labelled=False, model=model, notes=notes)
    if PROMPT_LENGTH in train.column_names:
        extra = extra.add_column(PROMPT_LENGTH, [-1] * len(extra))
    if kind == CLASSIFICATION and "labels" in train.column_names:  # (kd_alpha 1 reads no labels at all)
        extra = extra.add_column("labels", [IGNORE_INDEX] * len(extra))
    train = train.add_column(LABELLED, [1] * len(train))
    extra = extra.add_column(LABELLED, [0] * len(extra)).cast(train.features)
    logger.info("transfer set %s: %d unlabelled rows (KD only) mixed with %d labelled rows",
                data_args.transfer_file, len(extra), len(train))
    return datasets.concatenate_datasets([train, extra])
