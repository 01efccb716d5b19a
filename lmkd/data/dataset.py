"""Reading data, tokenising it per task, and the matching collators.

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

import logging
import os
import zlib
from dataclasses import dataclass, field

import datasets
from datasets.exceptions import DatasetGenerationError
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
)

from lmkd.core.constants import (
    CLASSIFICATION,
    DEFAULT_COLUMNS,
    IGNORE_INDEX,
    MLM,
    SEQ2SEQ,
    TASK_KIND,
    TASKS,
)
from lmkd.core.errors import LmkdError
from lmkd.core.io import read_rows, unreadable
from lmkd.models.truncation import (
    describe_truncation,
    encode_fitted,
    fit_length,
    input_limit,
    target_limit,
    truncation_note,
)

logger = logging.getLogger(__name__)


@dataclass
class DataArguments:
    """What to train on and how to tokenise it.

    Errors name these fields as distill's keys (``train_split``); a command whose flags are dashed
    (``evaluate``, ``cache-logits``, ``generate``, ``study``: :func:`lmkd.cli.dataset_flags.dashed`)
    sets the attributes ``dashed_flags = True`` (and ``split_advice``, for a missing split) so that
    its errors name its flags (``--split``) instead."""

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
}


def key_name(args, name: str) -> str:
    """The name the calling command gives the DataArguments field ``name``: distill's key, or with
    ``args.dashed_flags`` the flag of evaluate / cache-logits / generate / study."""
    return DASHED_FLAGS.get(name, name) if getattr(args, "dashed_flags", False) else name


def load_data(
    path: str,
    columns: list[str] | tuple[str, ...] = (),
    flags: list[str] | tuple[str, ...] = DISTILL_COLUMN_FLAGS,
) -> datasets.Dataset:
    """A ``datasets.Dataset`` from a file or a ``save_to_disk`` directory, checked for ``columns``.

    ``flags[i]`` is the option that names ``columns[i]`` in the calling command (distill's keys by
    default; ``lmkd evaluate`` and ``cache-logits`` pass ``--source-column``/``--target-column``),
    so the error for a missing column says which option to fix."""
    if os.path.isdir(path):
        try:
            ds = datasets.load_from_disk(path)
        except (FileNotFoundError, ValueError) as e:
            raise LmkdError(
                f"{path} is a directory but not a saved dataset; pass a .jsonl/.csv file or a "
                "directory written by `lmkd generate`"
            ) from e
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        if len(ds) == 0:
            raise LmkdError(f"dataset {path} is empty; it needs at least one row")
    else:
        ds = datasets.Dataset.from_list(read_rows(path))
    check_columns(ds, columns, flags, path)
    return ds


TRANSLATION = "translation"  # the column of the HF translation layout


def _load_named(args: DataArguments, split: str, required: bool) -> datasets.Dataset | None:
    """``split`` of ``args.dataset_name`` (None when absent and not ``required``)."""
    name, config = args.dataset_name, args.dataset_config_name
    dashed = getattr(args, "dashed_flags", False)
    # what to do about a split the data lack: distill's keys, --split, or the command's own words (study)
    other_split = getattr(args, "split_advice", None) or (
        "name one with --split" if dashed else "name one with train_split / validation_split"
    )
    ext = next(
        (
            e
            for e in (".parquet", ".jsonl", ".json", ".csv")
            if name.endswith(e) or name.endswith(e + ".gz")
        ),
        None,
    )
    try:
        if os.path.isdir(name) and any(
            os.path.exists(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json")
        ):
            ds = datasets.load_from_disk(name)
            ds = ds if isinstance(ds, datasets.DatasetDict) else datasets.DatasetDict({"train": ds})
            if "[" in split:
                raise LmkdError(
                    f"{name} is a saved dataset: its splits are whole ({split!r} slices one); "
                    + (
                        "name a whole split with --split"
                        if dashed
                        else "use max_train_samples / max_eval_samples"
                    )
                )
            if split not in ds:
                if required:
                    raise LmkdError(
                        f"dataset {name} has no split {split!r} (it has: {', '.join(ds)}); "
                        f"{other_split}"
                    )
                return None
            return ds[split]
        if ext is not None:
            builder = {".parquet": "parquet", ".csv": "csv"}.get(ext, "json")
            if split.split("[")[0] != "train":  # one file is one split
                if required:
                    raise LmkdError(
                        f"{name} is one file, read as the train split; "
                        + (
                            getattr(args, "split_advice", None)
                            or (
                                f"drop --split {split} (or pass the file with --data)"
                                if dashed
                                else "give the evaluation data as validation_file"
                            )
                        )
                    )
                return None
            return datasets.load_dataset(builder, data_files={"train": name}, split=split)
        found = datasets.get_dataset_split_names(name, config)
        if split.split("[")[0] not in found:
            if required:
                raise LmkdError(
                    f"dataset {name} has no split {split.split('[')[0]!r} (it has: {', '.join(found)}); "
                    f"{other_split}"
                )
            return None
        return datasets.load_dataset(name, config, split=split)
    except LmkdError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError, EOFError, zlib.error) as e:
        broken = unreadable(name, e)  # a truncated or corrupt data file
        if broken:
            raise LmkdError(f"{key_name(args, 'dataset_name')}: {broken}") from e
        raise LmkdError(
            f"cannot read {key_name(args, 'dataset_name')} {name!r}"
            + (f" ({config})" if config else "")
            + f": {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    except DatasetGenerationError as e:  # the builder's wrapper around what went wrong in the file
        cause = e.__cause__ or e.__context__ or e
        said = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
        detail = unreadable(name, cause) or f"cannot read {name!r}: {said}"
        raise LmkdError(f"{key_name(args, 'dataset_name')}: {detail}") from e


def read_split(
    args: DataArguments,
    split: str = "train",
    columns: list[str] | tuple[str, ...] = (),
    flags: list[str] | tuple[str, ...] = DISTILL_COLUMN_FLAGS,
) -> datasets.Dataset | None:
    """The training (``split="train"``) or evaluation (``"validation"``) rows of ``args``:
    ``train_file`` / ``validation_file``, else ``dataset_name``'s ``train_split`` / ``validation_split``
    (the default ``validation`` only when the dataset has it: None otherwise), the translation layout
    flattened into ``source_column`` / ``target_column`` (:func:`flatten_translation`), checked for
    ``columns``."""
    path = args.train_file if split == "train" else args.validation_file
    if path:
        ds = load_data(path, [] if args.source_lang else columns, flags)
    elif args.dataset_name:
        name = args.train_split if split == "train" else (args.validation_split or "validation")
        ds = _load_named(args, name, required=split == "train" or args.validation_split is not None)
        if ds is None:
            logger.info("dataset %s has no %s split: no evaluation data", args.dataset_name, name)
            return None
        if len(ds) == 0:
            raise LmkdError(
                f"split {name!r} of dataset {args.dataset_name} is empty; it needs at least one row"
            )
    else:
        return None
    ds = flatten_translation(ds, args)
    check_columns(ds, columns, flags, path or args.dataset_name)
    return ds


def flatten_translation(ds: datasets.Dataset, args: DataArguments) -> datasets.Dataset:
    """Rows ``{"translation": {src_lang: ..., tgt_lang: ...}}`` as ``source_column`` / ``target_column``
    (what transformers' ``run_translation.py`` reads with ``source_lang`` / ``target_lang``); other
    data, or no languages given, unchanged."""
    if not args.source_lang:
        return ds
    k = {
        name: key_name(args, name)
        for name in ("source_lang", "target_lang", "source_column", "target_column")
    }
    if TRANSLATION not in ds.column_names:
        raise LmkdError(
            f"{k['source_lang']}/{k['target_lang']} read a {TRANSLATION!r} column of {{language: text}}, "
            f"but the data has: {', '.join(ds.column_names)}; drop them and name "
            f"{k['source_column']} / {k['target_column']}"
        )
    first = ds[0][TRANSLATION]
    missing = [lang for lang in (args.source_lang, args.target_lang) if lang not in (first or {})]
    if missing:
        raise LmkdError(
            f"the {TRANSLATION!r} column has no language {missing[0]!r} (it has: "
            f"{', '.join(first or {})}); set {k['source_lang']} / {k['target_lang']} to its keys"
        )
    src, tgt, s_lang, t_lang = (
        args.source_column,
        args.target_column,
        args.source_lang,
        args.target_lang,
    )
    return ds.map(
        lambda row: {src: row[TRANSLATION][s_lang], tgt: row[TRANSLATION][t_lang]},
        remove_columns=[TRANSLATION],
        desc="reading the translation layout",
    )


def check_columns(ds: datasets.Dataset, columns, flags, where: str) -> None:
    """A one-line error naming the option to fix when ``ds`` lacks one of ``columns``."""
    missing = [
        (c, flag)
        for c, flag in zip(columns, list(flags) + [None] * len(columns))
        if c and c not in ds.column_names
    ]
    if missing:
        column, flag = missing[0]
        raise LmkdError(
            f"{where} has no column {column!r} (it has: {', '.join(ds.column_names)}); "
            + (f"name the right one with {flag}" if flag else "name the right column")
        )


def mix_gold_targets(
    ds: datasets.Dataset, target_column: str, gold_column: str, fraction: float, seed: int = 0
) -> datasets.Dataset:
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


def tokenize(
    ds: datasets.Dataset,
    tokenizer,
    args: DataArguments,
    labelled: bool = True,
    model=None,
    notes: list | None = None,
) -> datasets.Dataset:
    """Tokenise ``ds`` for ``args.task``; the original columns are dropped.

    Inputs are truncated to :func:`lmkd.models.truncation.fit_length` of ``args.max_source_length`` and the
    ``model`` (a model, config, path, or a list of them: every model that will read the data;
    None: the maximum alone), labels likewise to ``args.max_target_length`` and the decoder's
    table.  The rows cut are logged once per call; with ``notes`` each
    :func:`lmkd.models.truncation.truncation_note` is also appended to it."""
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
            labels, cut = encode_fitted(
                tokenizer, [str(t) for t in batch[tgt]], tgt_len, target=True
            )
            enc["labels"] = labels["input_ids"]
            enc[_CUT_TARGET] = _flags(len(texts), cut)
        elif labelled and kind == CLASSIFICATION:
            enc["labels"] = [int(v) for v in batch[tgt]]
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


class KeyedMasking(DataCollatorForLanguageModeling):
    """BERT's masking, with each batch's masks drawn from a generator seeded by ``seed`` and the
    batch's tokens, not from one stream.  A stream cannot be resumed exactly: the Trainer's data
    loader collates one batch ahead, so a checkpoint's saved random state (global, or the
    collator's own) has already drawn the next batch's masks, and a resumed run masked that
    batch differently from an uninterrupted one.  Keyed by content, the same batch gets the same
    masks in both; shuffled epochs make other batches, so masks still change between epochs."""

    def torch_mask_tokens(self, inputs, special_tokens_mask=None, offset_mapping=None):
        import hashlib

        import torch

        digest = hashlib.sha256(
            f"lmkd-mlm:{self.seed}:{tuple(inputs.shape)}:".encode()
            + inputs.to(torch.int64).numpy().tobytes()
        ).digest()
        self.generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return super().torch_mask_tokens(
            inputs, special_tokens_mask=special_tokens_mask, offset_mapping=offset_mapping
        )


def collator_for(
    task: str, tokenizer, model=None, mlm_probability: float = 0.15, seed: int | None = None
):
    """The HF collator for a task (dynamic padding; labels padded with IGNORE_INDEX, -100).  MLM
    with a ``seed``: masks drawn per batch from the seed and the batch's tokens (:class:`KeyedMasking`),
    so a resumed run masks each batch as an uninterrupted one does."""
    kind = TASK_KIND[task]
    if kind == SEQ2SEQ:
        return DataCollatorForSeq2Seq(
            tokenizer, model=model, label_pad_token_id=IGNORE_INDEX, padding=True
        )
    if kind == CLASSIFICATION:
        return DataCollatorWithPadding(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if kind == MLM and seed is not None:
        return KeyedMasking(tokenizer, mlm=True, mlm_probability=mlm_probability, seed=seed)
    return DataCollatorForLanguageModeling(
        tokenizer, mlm=(kind == MLM), mlm_probability=mlm_probability, seed=seed
    )
