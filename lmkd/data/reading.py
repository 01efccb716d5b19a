"""Reading rows: a data file or saved dataset (:func:`load_data`), a split of ``train_file`` /
``validation_file`` or of ``dataset_name`` (:func:`read_split`), the HF translation layout flattened
into two columns (:func:`flatten_translation`), the column check whose error names the flag to fix
(:func:`check_columns`), and gold targets mixed into pseudo-targets (:func:`mix_gold_targets`).
"""

from __future__ import annotations

import logging
import os
import zlib

import datasets
from datasets.exceptions import DatasetGenerationError

from lmkd.core.errors import LmkdError
from lmkd.core.io import read_rows, unreadable
from lmkd.data import chat
from lmkd.data.dataset import DISTILL_COLUMN_FLAGS, DataArguments, key_name

logger = logging.getLogger(__name__)


def load_data(
    path: str,
    columns: list[str] | tuple[str, ...] = (),
    flags: list[str] | tuple[str, ...] = DISTILL_COLUMN_FLAGS,
) -> datasets.Dataset:
    """A ``datasets.Dataset`` from a file or a ``save_to_disk`` directory, checked for ``columns``.

    ``flags[i]`` is the option that names ``columns[i]`` in the calling command (distill's keys by
    default; ``lmkd evaluate`` and ``cache-logits`` pass ``--source-column``/``--target-column``),
    so the error for a missing column says which option to fix.

    Args:
        path: a .jsonl/.json/.csv file (optionally gzipped) or a ``save_to_disk`` directory (of a
            ``DatasetDict``: its ``train`` split, else its first).
        columns: the columns the rows must have.
        flags: the option naming each of ``columns``.

    Returns:
        The rows as a ``datasets.Dataset``.

    Raises:
        LmkdError: the file cannot be read, the directory is not a saved dataset, the data are
            empty, or a column is missing.
    """
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
    """The training (``split="train"``) or evaluation (``"validation"``) rows of ``args``.

    ``train_file`` / ``validation_file``, else ``dataset_name``'s ``train_split`` /
    ``validation_split`` (the default ``validation`` only when the dataset has it: None
    otherwise), the translation layout flattened into ``source_column`` / ``target_column``
    (:func:`flatten_translation`), checked for ``columns``.

    Args:
        args: the data arguments.
        split: ``"train"`` or ``"validation"``.
        columns: the columns the rows must have.
        flags: the option naming each of ``columns`` (as :func:`load_data`).

    Returns:
        The rows, or None when there is no such data (no validation data given or found).

    Raises:
        LmkdError: the data cannot be read, lack a split that was asked for, are empty, or lack
            a column.
    """
    path = args.train_file if split == "train" else args.validation_file
    if path:
        ds = load_data(path, [], flags)
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
    if chat.row_format(ds.features, args) != chat.TEXT:  # causal-lm messages or prompt/completion
        columns = [
            c for c in columns if c != args.source_column and c != args.prompt_column
        ] + chat.data_columns(ds.features, args)
        if args.prompt_column:
            raise LmkdError(
                f"{key_name(args, 'prompt_column')} is for text rows: chat and prompt/completion "
                "rows give each row's prompt themselves (before the last assistant turn or the "
                "completion); drop it"
            )
    check_columns(ds, columns, flags, path or args.dataset_name)
    return ds


def flatten_translation(ds: datasets.Dataset, args: DataArguments) -> datasets.Dataset:
    """Rows ``{"translation": {src_lang: ..., tgt_lang: ...}}`` as ``source_column`` /
    ``target_column`` (what transformers' ``run_translation.py`` reads with ``source_lang`` /
    ``target_lang``); other data, or no languages given, unchanged.

    Args:
        ds: the rows.
        args: the data arguments (``source_lang`` / ``target_lang``, the column names).

    Returns:
        ``ds`` with the two columns in place of ``translation``, or ``ds`` itself.

    Raises:
        LmkdError: languages are given but ``ds`` has no ``translation`` column, or its first row
            lacks one of them.
    """
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
    """A one-line error naming the option to fix when ``ds`` lacks one of ``columns``.

    Args:
        ds: the rows.
        columns: the columns needed (empty names are skipped).
        flags: the option naming each of ``columns`` (fewer: the rest named generically).
        where: the data's name (path or dataset), for the error.

    Raises:
        LmkdError: a column is missing (the first one, with its option).
    """
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
    ``target_column`` from ``gold_column`` (a mix of teacher pseudo-targets and gold references).

    Args:
        ds: the rows, with both columns.
        target_column: the label column (the teacher's pseudo-targets).
        gold_column: the gold reference column.
        fraction: the share of rows given their gold reference, in [0, 1].
        seed: seeds the draw of rows.

    Returns:
        The mapped dataset.
    """
    import random

    n = round(fraction * len(ds))
    gold = set(random.Random(seed).sample(range(len(ds)), n))

    def fn(row, idx):
        return {target_column: row[gold_column] if idx in gold else row[target_column]}

    return ds.map(fn, with_indices=True, desc="mixing gold targets")
