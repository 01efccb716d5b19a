"""Tokenising rows per task (:func:`tokenize`): inputs and labels fitted by
:mod:`lmkd.models.truncation`'s rule, the rows cut logged once, and each row's prompt length in
tokens (:func:`prompt_lengths`, the ``PROMPT_LENGTH`` column) for a causal LM's ``prompt_column``.
Causal-lm chat and prompt/completion rows are :mod:`lmkd.data.chat`'s: labelled on the assistant's
(completion's) tokens only, each with its prompt length.
"""

from __future__ import annotations

import logging

import datasets

from lmkd.core.constants import CLASSIFICATION, SEQ2SEQ, TASK_KIND
from lmkd.core.errors import LmkdError
from lmkd.data import chat
from lmkd.data.dataset import DataArguments
from lmkd.models.truncation import (
    describe_truncation,
    encode_fitted,
    fit_length,
    input_limit,
    target_limit,
    truncation_note,
)

logger = logging.getLogger(__name__)


#: temporary columns of :func:`tokenize`: 1 where the row's input (target) was truncated
_CUT_SOURCE, _CUT_TARGET = "lmkd_truncated_input", "lmkd_truncated_target"


def _flags(n: int, cut: list[int]) -> list[int]:
    flags = [0] * n
    for i in cut:
        flags[i] = 1
    return flags


def tokenize(
    ds: datasets.Dataset,
    tokenizer,
    args: DataArguments,
    labelled: bool = True,
    model=None,
    notes: list | None = None,
) -> datasets.Dataset:
    """Tokenise ``ds`` for ``args.task``; the original columns are dropped.

    Inputs are truncated to :func:`lmkd.models.truncation.fit_length` of
    ``args.max_source_length`` and the ``model``, labels likewise to ``args.max_target_length``
    and the decoder's table.  The rows cut are logged once per call; with ``notes`` each
    :func:`lmkd.models.truncation.truncation_note` is also appended to it.

    Args:
        ds: the rows (``args.source_column``, and ``args.target_column`` when labelled).
        tokenizer: the tokenizer.
        args: the data arguments (task, columns, prefix, lengths, ``prompt_column``).
        labelled: tokenise the labels too (seq2seq targets, classification labels).
        model: a model, config, path, or a list of them: every model that will read the data
            (None: the maximum lengths alone).
        notes: a list that each truncation note is appended to (None: logged only).

    Returns:
        The tokenised dataset (``input_ids``, ``attention_mask``, ``labels`` where labelled, and
        :data:`PROMPT_LENGTH` with a ``prompt_column`` on a causal or MLM task, and the rows'
        :data:`TEACHER_ID` when ``ds`` has that column).  Causal-lm chat and prompt/completion rows
        (:func:`lmkd.data.chat.row_format`) always get ``labels`` (``IGNORE_INDEX`` but on the
        assistant's tokens) and :data:`PROMPT_LENGTH`.

    Raises:
        LmkdError: as :func:`prompt_lengths`, or :func:`lmkd.data.chat.encode_rows`.
    """
    src, tgt = args.source_column, args.target_column
    kind = TASK_KIND[args.task]
    src_len = fit_length(args.max_source_length, model, tokenizer, "inputs")
    with_targets = labelled and kind == SEQ2SEQ
    tgt_len = fit_length(args.max_target_length, model, None, "targets") if with_targets else None
    features = ds.features
    rows = chat.row_format(features, args)
    if rows != chat.TEXT:
        chat.check_chat_data(features, tokenizer, args)  # no template: one line, before any row

    def fn(batch):
        if rows != chat.TEXT:
            enc, cut = chat.encode_rows(batch, features, tokenizer, args, src_len)
            enc[PROMPT_LENGTH] = enc.pop("prompt_lengths")
            enc[_CUT_SOURCE] = _flags(len(enc["input_ids"]), cut)
            if TEACHER_ID in batch:
                enc[TEACHER_ID] = [int(v) for v in batch[TEACHER_ID]]
            return enc
        texts = [args.source_prefix + str(t) for t in batch[src]]
        enc, cut = encode_fitted(tokenizer, texts, src_len)
        enc[_CUT_SOURCE] = _flags(len(texts), cut)
        if with_targets:
            labels, cut = encode_fitted(
                tokenizer, [str(t) for t in batch[tgt]], tgt_len, target=True
            )
            enc["labels"] = labels["input_ids"]
            enc[_CUT_TARGET] = _flags(len(texts), cut)
        elif labelled and kind == CLASSIFICATION:
            enc["labels"] = [int(v) for v in batch[tgt]]
        if TEACHER_ID in batch:  # the served teacher each row goes to (teacher_server_url a,b)
            enc[TEACHER_ID] = [int(v) for v in batch[TEACHER_ID]]
        if args.prompt_column and kind not in (SEQ2SEQ, CLASSIFICATION):
            enc[PROMPT_LENGTH] = prompt_lengths(
                tokenizer, texts, batch[args.prompt_column], enc["input_ids"], args
            )
        return enc

    out = ds.map(fn, batched=True, remove_columns=ds.column_names, desc="tokenising")
    found = [
        ("inputs", _CUT_SOURCE, src_len, args.max_source_length, input_limit(model, tokenizer))
    ]
    if with_targets:
        found.append(("targets", _CUT_TARGET, tgt_len, args.max_target_length, target_limit(model)))
    for what, column, length, requested, positions in found:
        cut = int(sum(out[column])) if column in out.column_names else 0
        note = truncation_note(what, len(out), cut, length, requested, positions)
        (logger.warning if note["truncated"] and length != requested else logger.info)(
            "tokenising: %s", describe_truncation(note)
        )
        if notes is not None:
            notes.append(note)
    return out.remove_columns([c for c in (_CUT_SOURCE, _CUT_TARGET) if c in out.column_names])


#: the tokenised column (and batch key) of each row's prompt length in tokens (``prompt_column``)
PROMPT_LENGTH = "lmkd_prompt_length"
#: the data column (kept by :func:`tokenize`) naming, per row, which of several served teachers
#: scores it: its index in ``teacher_server_url``'s comma-separated list
TEACHER_ID = "teacher_id"


def prompt_lengths(tokenizer, texts, prompts, input_ids, args: DataArguments) -> list[int]:
    """Per row, the number of its tokens that are its prompt: ``prompts`` holds token counts, or
    texts the row's text starts with (then: the tokens the prompt and the row share at the start).

    Args:
        tokenizer: the tokenizer (tokenises text prompts).
        texts: the rows' texts, prefix included.
        prompts: per row, its prompt's length in tokens or its text (without the prefix).
        input_ids: per row, its token ids.
        args: the data arguments (``source_prefix``, ``max_source_length``, the column names).

    Returns:
        Per row, its prompt's length in tokens (at most the row's length).

    Raises:
        LmkdError: a row's text does not start with its prompt, or a prompt has under 1 token.
    """
    out = []
    for text, prompt, ids in zip(texts, prompts, input_ids):
        if isinstance(prompt, int) and not isinstance(prompt, bool):
            n = prompt
        else:
            prompt = args.source_prefix + str(prompt)
            if not text.startswith(prompt):
                raise LmkdError(
                    f"a row's {args.source_column} does not start with its {args.prompt_column} "
                    f"({prompt[:40]!r}...); the prompt column holds each row's prompt text (or its "
                    "length in tokens)"
                )
            p_ids = tokenizer(prompt, max_length=args.max_source_length, truncation=True)[
                "input_ids"
            ]
            n = next(
                (i for i, (a, b) in enumerate(zip(p_ids, ids)) if a != b), min(len(p_ids), len(ids))
            )
        if n < 1:
            raise LmkdError(
                f"a row of {args.prompt_column!r} gives a prompt of {n} tokens; a prompt needs >= 1"
            )
        out.append(min(int(n), len(ids)))
    return out
