"""What to train on and how to tokenise it: :class:`DataArguments`, and the names its errors give its
fields (:func:`key_name`).  Reading the rows is :mod:`lmkd.data.reading`'s, tokenising them
:mod:`lmkd.data.tokenizing`'s, the collators :mod:`lmkd.data.collators`'.

Data files are JSON lines (``.jsonl``, optionally ``.gz``), a JSON list, CSV, or a ``datasets``
dataset saved with ``save_to_disk`` (what ``lmkd generate`` writes).  Or, as in transformers'
``run_translation.py``, ``dataset_name`` (+ ``dataset_config_name``) read with
``datasets.load_dataset`` -- a hub id (where the network allows), a directory of data files, a
``.parquet``/``.json(l)``/``.csv`` file or a ``save_to_disk`` directory -- and its splits
``train_split`` / ``validation_split``.  Columns are named: ``source``/``target`` for translation,
``document``/``summary`` for summarisation, ``text``/``label`` for classification, ``text`` for mlm
and causal-lm -- each name is an option; rows in the HF translation layout
(``{"translation": {"en": ..., "fr": ...}}``) are read with ``source_lang`` / ``target_lang``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from lmkd.core.constants import DEFAULT_COLUMNS, TASKS
from lmkd.core.errors import LmkdError


@dataclass
class DataArguments:
    """What to train on and how to tokenise it.

    Errors name these fields as distill's keys (``train_split``); a command whose flags are dashed
    (``evaluate``, ``cache-logits``, ``generate``, ``study``: :func:`lmkd.cli.dataset_flags.dashed`)
    sets the attributes ``dashed_flags = True`` (and ``split_advice``, for a missing split) so that
    its errors name its flags (``--split``) instead.  Each field's ``help`` says more.

    Attributes:
        task: one of :data:`lmkd.core.constants.TASKS`.
        train_file: training data (.jsonl[.gz], .json, .csv or a save_to_disk dir); this or
            ``dataset_name``, not both.
        validation_file: optional evaluation data, same format.
        source_column: the input column (default by task: source / document / text).
        target_column: the label column (default by task: target / summary / label).
        source_prefix: text put before every input (T5's task prefix).
        max_source_length: inputs are truncated to this many tokens (>= 1).
        max_target_length: targets are truncated to this many tokens (>= 1).
        max_train_samples: use only the first N training rows.
        max_eval_samples: use only the first N evaluation rows.
        mlm_probability: mlm only: the share of tokens masked, in (0, 1].
        mix_gold_fraction: seq-KD: the share of training rows, in [0, 1], labelled with
            ``gold_column`` instead of ``target_column``.
        gold_column: the gold reference column for ``mix_gold_fraction`` (default by task); must
            differ from ``target_column``.
        prompt_column: causal-lm on-policy KD: each row's prompt, as text or a length in tokens.
        dataset_name: instead of ``train_file``: what ``datasets.load_dataset`` reads (a hub id,
            a directory or a data file).
        dataset_config_name: the dataset's configuration (e.g. ro-en).
        train_split: ``dataset_name``'s training split (slices work).
        validation_split: ``dataset_name``'s evaluation split (default: validation, if any).
        source_lang: translation layout: the source language key; goes with ``target_lang``.
        target_lang: translation layout: the target language key.
        transfer_file: an unlabelled transfer set mixed into the training data (KD only, no CE).
        chat_template: causal-lm chat rows: a Jinja chat template file to render them with
            (default: the tokenizer's own); see :mod:`lmkd.data.chat`.

    Raises:
        LmkdError: (on construction) an unknown task, neither or both of ``train_file`` and
            ``dataset_name``, one language key without the other, or a value out of range.
    """

    task: str = field(metadata={"help": f"One of {', '.join(TASKS)}."})
    train_file: str | None = field(
        default=None,
        metadata={
            "help": "Training data: .jsonl[.gz], .json, .csv or a save_to_disk dir (or give dataset_name)."
        },
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Optional evaluation data, same format."}
    )
    source_column: str | None = field(
        default=None, metadata={"help": "Input column (default: source / document / text by task)."}
    )
    target_column: str | None = field(
        default=None,
        metadata={
            "help": "Label column (default: target / summary / label by task). "
            "For seq-KD, the teacher's output column of `lmkd generate`."
        },
    )
    source_prefix: str = field(
        default="",
        metadata={
            "help": "Text put before every input, e.g. 'translate English to French: ' for T5."
        },
    )
    max_source_length: int = field(
        default=128, metadata={"help": "Inputs are truncated to this many tokens."}
    )
    max_target_length: int = field(
        default=128, metadata={"help": "Targets are truncated to this many tokens."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N training rows."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Use only the first N evaluation rows."}
    )
    mlm_probability: float = field(
        default=0.15, metadata={"help": "mlm only: share of tokens masked (BERT: 0.15)."}
    )
    mix_gold_fraction: float = field(
        default=0.0,
        metadata={
            "help": "Seq-KD on `lmkd generate` output: share of training rows (drawn with the "
            "seed) whose label is the gold reference (gold_column) instead of "
            "target_column. 0 = all pseudo-targets, 1 = all gold."
        },
    )
    gold_column: str | None = field(
        default=None,
        metadata={
            "help": "Gold reference column for mix_gold_fraction (default: target / summary "
            "by task)."
        },
    )
    prompt_column: str | None = field(
        default=None,
        metadata={
            "help": "causal-lm with on-policy KD: the column holding each row's prompt -- its text "
            "(the row's text starts with it) or its length in tokens. The student "
            "continues each row's own prompt (default: the first "
            "on_policy_prompt_tokens tokens of each row)."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Instead of train_file: a dataset read with datasets.load_dataset -- a hub id (e.g. wmt16), a "
            "directory of data files, a .parquet/.json/.jsonl/.csv file, or a save_to_disk directory."
        },
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The dataset's configuration, e.g. ro-en for wmt16."}
    )
    train_split: str = field(
        default="train",
        metadata={
            "help": "dataset_name's training split (default train; slices like train[:1000] work)."
        },
    )
    validation_split: str | None = field(
        default=None,
        metadata={
            "help": "dataset_name's evaluation split (default: validation, when the dataset has one; none when "
            "validation_file is given)."
        },
    )
    source_lang: str | None = field(
        default=None,
        metadata={
            "help": "Translation layout {'translation': {'en': ..., 'fr': ...}}: the source language key (e.g. en)."
        },
    )
    target_lang: str | None = field(
        default=None, metadata={"help": "Translation layout: the target language key (e.g. fr)."}
    )
    transfer_file: str | None = field(
        default=None,
        metadata={
            "help": "Unlabelled transfer set mixed into train_file (classification, causal-lm, "
            "mlm): only source_column is read; its rows get KD only, no CE."
        },
    )

    chat_template: str | None = field(
        default=None,
        metadata={
            "help": "causal-lm rows of chat messages ({'messages': [{'role': ..., 'content': "
            "...}]}): a Jinja chat template file to render them with (default: the tokenizer's "
            "chat template). Only the assistant turns are learned (docs/chat-data.md)."
        },
    )

    def __post_init__(self):
        if self.task not in TASKS:
            raise LmkdError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if bool(self.train_file) == bool(self.dataset_name):
            raise LmkdError(
                "give the training data as train_file (a file or save_to_disk dir) or as dataset_name "
                "(datasets.load_dataset), " + ("not both" if self.train_file else "one of them")
            )
        if bool(self.source_lang) != bool(self.target_lang):
            raise LmkdError(
                "source_lang and target_lang go together: the keys of the 'translation' column's "
                "languages, e.g. source_lang en, target_lang fr"
            )
        for name in (
            "max_source_length",
            "max_target_length",
            "max_train_samples",
            "max_eval_samples",
        ):
            value = getattr(self, name)
            if (
                value is not None and not value >= 1
            ):  # 0 rows or tokens: nothing to train on or all cut
                raise LmkdError(f"{key_name(self, name)} must be >= 1, got {value}")
        if self.chat_template and not os.path.isfile(self.chat_template):
            raise LmkdError(
                f"{key_name(self, 'chat_template')}: no file {self.chat_template!r}; give a Jinja "
                "chat template file"
            )
        if not 0.0 < self.mlm_probability <= 1.0:
            raise LmkdError(f"mlm_probability must be in (0, 1], got {self.mlm_probability}")
        src, tgt = DEFAULT_COLUMNS[self.task]
        self.source_column = self.source_column or src
        self.target_column = self.target_column or tgt
        if not 0.0 <= self.mix_gold_fraction <= 1.0:
            raise LmkdError(f"mix_gold_fraction must be in [0, 1], got {self.mix_gold_fraction}")
        if self.mix_gold_fraction > 0:
            self.gold_column = self.gold_column or tgt
            if self.gold_column == self.target_column:
                raise LmkdError(
                    f"mix_gold_fraction mixes gold_column into target_column but both are "
                    f"{self.gold_column!r}; set target_column: teacher_target (lmkd generate output)"
                )


#: the distill keys that name the columns load_data is asked for, in order (source, target, gold)
DISTILL_COLUMN_FLAGS = ("--source-column", "--target-column", "--gold-column")

#: how the commands with dashed flags (DataArguments.dashed_flags) name the fields their errors mention
DASHED_FLAGS = {
    "dataset_name": "--dataset-name",
    "source_lang": "--source-lang",
    "target_lang": "--target-lang",
    "source_column": "--source-column",
    "target_column": "--target-column",
    "prompt_column": "--prompt-column",
    "chat_template": "--chat-template",
}


def key_name(args, name: str) -> str:
    """The name the calling command gives the DataArguments field ``name``: distill's key, or with
    ``args.dashed_flags`` the flag of evaluate / cache-logits / generate / study.

    Args:
        args: the :class:`DataArguments` (or any object with ``dashed_flags``).
        name: the field's name.

    Returns:
        ``name``, or its flag from :data:`DASHED_FLAGS` (``name`` when it has none).
    """
    return DASHED_FLAGS.get(name, name) if getattr(args, "dashed_flags", False) else name
