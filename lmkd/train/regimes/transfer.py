"""Unlabelled transfer sets: ``transfer_file`` rows mixed into a labelled training set.

Their rows get KD but no CE, and the CE is averaged over the labelled rows only.  The data side
(:func:`unlabelled_data_args`, :func:`read_transfer_set`, :func:`add_transfer_set`) and the collator
that reads their flag (:class:`TransferCollator`) live here; the masks come from
:class:`lmkd.train.regimes.base.RegimeTrainer`.
"""

from __future__ import annotations

import copy
import logging

import datasets
import torch

from lmkd.core.constants import CLASSIFICATION, IGNORE_INDEX, SEQ2SEQ, TASK_KIND
from lmkd.core.errors import LmkdError
from lmkd.data.reading import load_data
from lmkd.data.tokenizing import PROMPT_LENGTH, tokenize

logger = logging.getLogger(__name__)

#: batch key: per row, whether it has a label (rows of a transfer_file have none)
LABELLED = "lmkd_labelled"


class TransferCollator:
    """Wraps a task's collator: takes the :data:`LABELLED` flag off every example, collates the rest,
    sets the labels of unlabelled rows to -100 (causal-lm/mlm; classification rows already have
    -100) and returns the flags as a boolean tensor under :data:`LABELLED`.

    Args:
        collator: the task's collator, called on the examples without the flag.
        kind: the model kind (classification rows keep their labels as they are).
    """

    def __init__(self, collator, kind: str):
        self.collator, self.kind = collator, kind

    def __call__(self, features):
        flags = torch.tensor([bool(f.get(LABELLED, 1)) for f in features], dtype=torch.bool)
        batch = self.collator([{k: v for k, v in f.items() if k != LABELLED} for f in features])
        labels = batch.get("labels")
        if labels is not None and self.kind != CLASSIFICATION:
            batch["labels"] = labels.masked_fill(~flags[:, None], IGNORE_INDEX)
        batch[LABELLED] = flags
        return batch


def unlabelled_data_args(data_args, args, evaluation: bool = False):
    """``data_args`` with no label column when the run never uses one, so none is read (and the
    data needs none): a classification run with ``kd_alpha: 1`` is supervised by the teacher alone;
    a seq2seq run with ``on_policy_fraction: 1`` trains only on the student's own outputs (its
    training data are inputs alone; the validation data keep their targets, ``evaluation=True``).
    Other runs are returned as they are: causal-lm and mlm read no label column anyway, and a
    seq2seq student trained off-policy needs target tokens (``lmkd generate`` makes them).

    Args:
        data_args: the run's DataArguments.
        args: the run's DistillationConfig.
        evaluation: whether these are the validation data's arguments.

    Returns:
        ``data_args``, or a copy without ``target_column``.
    """
    kind = TASK_KIND[data_args.task]
    drop = (kind == CLASSIFICATION and args.kd_alpha == 1) or (
        kind == SEQ2SEQ and args.on_policy_fraction == 1 and not evaluation
    )
    if drop and data_args.target_column:
        data_args = copy.copy(data_args)
        data_args.target_column = None
    return data_args


def read_transfer_set(data_args) -> datasets.Dataset | None:
    """The source column (and nothing else) of ``data_args.transfer_file``.

    Args:
        data_args: the run's DataArguments.

    Returns:
        The transfer set's rows, or None without a ``transfer_file``.

    Raises:
        LmkdError: for a seq2seq task (its student needs target tokens).
    """
    if not data_args.transfer_file:
        return None
    if TASK_KIND[data_args.task] == SEQ2SEQ:
        raise LmkdError(
            "transfer_file: a seq2seq student cannot train without target tokens; give the transfer "
            "set the teacher's outputs with `lmkd generate --teacher T --data FILE --output DIR` and "
            "train on DIR (target_column teacher_target), or train on it alone with on_policy_fraction 1"
        )
    return load_data(data_args.transfer_file, [data_args.source_column]).select_columns(
        [data_args.source_column]
    )


def add_transfer_set(
    train: datasets.Dataset,
    raw: datasets.Dataset,
    data_args,
    tokenizer,
    model=None,
    notes: list | None = None,
) -> datasets.Dataset:
    """``train`` (tokenised) plus the tokenised rows of ``raw`` (:func:`read_transfer_set`), each
    tagged with :data:`LABELLED` (1 for ``train``, 0 for the transfer set).  The
    Trainer's shuffling sampler interleaves the two.

    Args:
        train: the tokenised training data.
        raw: the transfer set's rows.
        data_args: the run's DataArguments.
        tokenizer: the student's tokenizer.
        model: the models whose position tables limit the length (:func:`lmkd.data.tokenizing.tokenize`).
        notes: receives the truncation notes of the transfer rows.

    Returns:
        The two sets concatenated.
    """
    kind = TASK_KIND[data_args.task]
    plain = copy.copy(data_args)
    plain.prompt_column = (
        None  # a transfer set has no prompt column: its rows use on_policy_prompt_tokens
    )
    extra = tokenize(raw, tokenizer, plain, labelled=False, model=model, notes=notes)
    if PROMPT_LENGTH in train.column_names:
        extra = extra.add_column(PROMPT_LENGTH, [-1] * len(extra))
    if (
        kind == CLASSIFICATION and "labels" in train.column_names
    ):  # (kd_alpha 1 reads no labels at all)
        extra = extra.add_column("labels", [IGNORE_INDEX] * len(extra))
    elif "labels" in train.column_names and "labels" not in extra.column_names:
        # causal chat rows carry their labels; text rows' labels are every token, as the collator's
        extra = extra.add_column("labels", [list(ids) for ids in extra["input_ids"]])
    train = train.add_column(LABELLED, [1] * len(train))
    extra = extra.add_column(LABELLED, [0] * len(extra)).cast(train.features)
    logger.info(
        "transfer set %s: %d unlabelled rows (KD only) mixed with %d labelled rows",
        data_args.transfer_file,
        len(extra),
        len(train),
    )
    return datasets.concatenate_datasets([train, extra])
