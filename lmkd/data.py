"""Reading data files from disk, tokenising them per task, and the matching collators.

Data files are JSON lines (``.jsonl``, optionally ``.gz``), a JSON list, CSV, or a ``datasets``
dataset saved with ``save_to_disk`` (what ``lmkd generate`` writes).  Columns are named:
``source``/``target`` for translation, ``document``/``summary`` for summarisation, ``text``/``label``
for classification, ``text`` for mlm and causal-lm -- each name is an option.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import datasets
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
)

from .constants import CLASSIFICATION, DEFAULT_COLUMNS, IGNORE_INDEX, MLM, SEQ2SEQ, TASK_KIND, TASKS
from .errors import LmkdError
from .io import read_rows
from .truncation import describe_truncation, encode_fitted, fit_length, input_limit, target_limit, truncation_note

logger = logging.getLogger(__name__)


@dataclass
class DataArguments:
    """What to train on and how to tokenise it."""

    task: str = field(metadata={"help": f"One of {', '.join(TASKS)}."})
    train_file: str = field(metadata={"help": "Training data: .jsonl[.gz], .json, .csv or a save_to_disk dir."})
    validation_file: str | None = field(default=None, metadata={"help": "Optional evaluation data, same format."})
    source_column: str | None = field(
        default=None, metadata={"help": "Input column (default: source / document / text by task)."})
    target_column: str | None = field(
        default=None, metadata={"help": "Label column (default: target / summary / label by task). "
                                        "For seq-KD, the teacher's output column of `lmkd generate`."})
    source_prefix: str = field(default="", metadata={"help": "Text put before every input, e.g. 'translate "
                                                             "English to French: ' for T5."})
    max_source_length: int = field(default=128, metadata={"help": "Inputs are truncated to this many tokens."})
    max_target_length: int = field(default=128, metadata={"help": "Targets are truncated to this many tokens."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows."})
    mlm_probability: float = field(default=0.15, metadata={"help": "mlm only: share of tokens masked (BERT: 0.15)."})
    mix_gold_fraction: float = field(
        default=0.0, metadata={"help": "Seq-KD on `lmkd generate` output: share of training rows (drawn with the "
                                       "seed) whose label is the gold reference (gold_column) instead of "
                                       "target_column. 0 = all pseudo-targets, 1 = all gold."})
    gold_column: str | None = field(
        default=None, metadata={"help": "Gold reference column for mix_gold_fraction (default: target / summary "
                                        "by task)."})
    prompt_column: str | None = field(
        default=None, metadata={"help": "causal-lm with on-policy KD: the column holding each row's prompt -- its text "
                                        "(the row's text starts with it) or its length in tokens. The student "
                                        "continues each row's own prompt (default: the first "
                                        "on_policy_prompt_tokens tokens of each row)."})
    transfer_file: str | None = field(
        default=None, metadata={"help": "Unlabelled transfer set mixed into train_file (classification, causal-lm, "
                                        "mlm): only source_column is read; its rows get KD only, no CE."})

    def __post_init__(self):
        if self.task not in TASKS:
            raise LmkdError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        src, tgt = DEFAULT_COLUMNS[self.task]
        self.source_column = self.source_column or src
        self.target_column = self.target_column or tgt
        if not 0.0 <= self.mix_gold_fraction <= 1.0:
            raise LmkdError(f"mix_gold_fraction must be in [0, 1], got {self.mix_gold_fraction}")
        if self.mix_gold_fraction > 0:
            self.gold_column = self.gold_column or tgt
            if self.gold_column == self.target_column:
                raise LmkdError(f"mix_gold_fraction mixes gold_column into target_column but both are "
                                f"{self.gold_column!r}; set target_column: teacher_target (lmkd generate output)")


#: the distill keys that name the columns load_data is asked for, in order (source, target, gold)
DISTILL_COLUMN_FLAGS = ("--source_column", "--target_column", "--gold_column")


def load_data(path: str, columns: list[str] | tuple[str, ...] = (),
              flags: list[str] | tuple[str, ...] = DISTILL_COLUMN_FLAGS) -> datasets.Dataset:
    """A ``datasets.Dataset`` from a file or a ``save_to_disk`` directory, checked for ``columns``.

    ``flags[i]`` is the option that names ``columns[i]`` in the calling command (distill's keys by
    default; ``lmkd evaluate`` and ``cache-logits`` pass ``--source-column``/``--target-column``),
    so the error for a missing column says which option to fix."""
    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as e:
            raise LmkdError(f"{path} is a directory but not a saved dataset; pass a .jsonl/.csv file or a "
                            "directory written by `lmkd generate`") from e
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        if len(ds) == 0:
            raise LmkdError(f"dataset {path} is empty; it needs at least one row")
    else:
        ds = datasets.Dataset.from_list(read_rows(path))
    missing = [(c, flag) for c, flag in zip(columns, list(flags) + [None] * len(columns))
               if c and c not in ds.column_names]
    if missing:
        column, flag = missing[0]
        raise LmkdError(f"{path} has no column {column!r} (it has: {', '.join(ds.column_names)}); "
                        + (f"name the right one with {flag}" if flag else "name the right column"))
    return ds


def mix_gold_targets(ds: datasets.Dataset, target_column: str, gold_column: str, fraction: float,
                     seed: int = 0) -> datasets.Dataset:
    """``ds`` with ``round(fraction * len(ds))`` rows, drawn at random with ``seed``, taking their
    ``target_column`` from ``gold_column`` (a mix of teacher pseudo-targets and gold references)."""
    import random

    n = round(fraction * len(ds))
    gold = set(random.Random(seed).sample(range(len(ds)), n))

    def fn(row, idx):
        return {target_column: row[gold_column] if idx in gold else row[target_column]}

    return ds.map(fn, with_indices=True, desc="mixing gold targets")


#: temporary columns of :func:`tokenize`: 1 where the row's input (target) was truncated
_CUT_SOURCE, _CUT_TARGET = "lmkd_truncated_input", "lmkd_truncated_target"


def _flags(n: int, cut: list[int]) -> list[int]:
    flags = [0] * n
    for i in cut:
        flags[i] = 1
    return flags


def tokenize(ds: datasets.Dataset, tokenizer, args: DataArguments, labelled: bool = True, model=None,
             notes: list | None = None) -> datasets.Dataset:
    """Tokenise ``ds`` for ``args.task``; the original columns are dropped.

    Inputs are truncated to :func:`lmkd.truncation.fit_length` of ``args.max_source_length`` and the
    ``model`` (a model, config, path, or a list of them: every model that will read the data;
    None: the maximum alone), labels likewise to ``args.max_target_length`` and the decoder's
    table.  The rows cut are logged once per call; with ``notes`` each
    :func:`lmkd.truncation.truncation_note` is also appended to it."""
    src, tgt = args.source_column, args.target_column
    kind = TASK_KIND[args.task]
    src_len = fit_length(args.max_source_length, model, tokenizer, "inputs")
    with_targets = labelled and kind == SEQ2SEQ
    tgt_len = fit_length(args.max_target_length, model, None, "targets") if with_targets else None

    def fn(batch):
        texts = [args.source_prefix + str(t) for t in batch[src]]
        enc, cut = encode_fitted(tokenizer, texts, src_len)
        enc[_CUT_SOURCE] = _flags(len(texts), cut)
        if with_targets:
            labels, cut = encode_fitted(tokenizer, [str(t) for t in batch[tgt]], tgt_len, target=True)
            enc["labels"] = labels["input_ids"]
            enc[_CUT_TARGET] = _flags(len(texts), cut)
        elif labelled and kind == CLASSIFICATION:
            enc["labels"] = [int(v) for v in batch[tgt]]
        if args.prompt_column and kind not in (SEQ2SEQ, CLASSIFICATION):
            enc[PROMPT_LENGTH] = prompt_lengths(tokenizer, texts, batch[args.prompt_column], enc["input_ids"], args)
        return enc

    out = ds.map(fn, batched=True, remove_columns=ds.column_names, desc="tokenising")
    found = [("inputs", _CUT_SOURCE, src_len, args.max_source_length, input_limit(model, tokenizer))]
    if with_targets:
        found.append(("targets", _CUT_TARGET, tgt_len, args.max_target_length, target_limit(model)))
    for what, column, length, requested, positions in found:
        cut = int(sum(out[column])) if column in out.column_names else 0
        note = truncation_note(what, len(out), cut, length, requested, positions)
        (logger.warning if note["truncated"] and length != requested else logger.info)(
            "tokenising: %s", describe_truncation(note))
        if notes is not None:
            notes.append(note)
    return out.remove_columns([c for c in (_CUT_SOURCE, _CUT_TARGET) if c in out.column_names])


#: the tokenised column (and batch key) of each row's prompt length in tokens (``prompt_column``)
PROMPT_LENGTH = "lmkd_prompt_length"


def prompt_lengths(tokenizer, texts, prompts, input_ids, args: DataArguments) -> list[int]:
    """Per row, the number of its tokens that are its prompt: ``prompts`` holds token counts, or
    texts the row's text starts with (then: the tokens the prompt and the row share at the start)."""
    out = []
    for text, prompt, ids in zip(texts, prompts, input_ids):
        if isinstance(prompt, int) and not isinstance(prompt, bool):
            n = prompt
        else:
            prompt = args.source_prefix + str(prompt)
            if not text.startswith(prompt):
                raise LmkdError(f"a row's {args.source_column} does not start with its {args.prompt_column} "
                                f"({prompt[:40]!r}...); the prompt column holds each row's prompt text (or its "
                                "length in tokens)")
            p_ids = tokenizer(prompt, max_length=args.max_source_length, truncation=True)["input_ids"]
            n = next((i for i, (a, b) in enumerate(zip(p_ids, ids)) if a != b), min(len(p_ids), len(ids)))
        if n < 1:
            raise LmkdError(f"a row of {args.prompt_column!r} gives a prompt of {n} tokens; a prompt needs >= 1")
        out.append(min(int(n), len(ids)))
    return out


def collator_for(task: str, tokenizer, model=None, mlm_probability: float = 0.15, seed: int | None = None):
    """The HF collator for a task (dynamic padding; labels padded with IGNORE_INDEX, -100)."""
    kind = TASK_KIND[task]
    if kind == SEQ2SEQ:
        return DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=IGNORE_INDEX, padding=True)
    if kind == CLASSIFICATION:
        return DataCollatorWithPadding(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return DataCollatorForLanguageModeling(tokenizer, mlm=(kind == MLM), mlm_probability=mlm_probability,
                                           seed=seed)
