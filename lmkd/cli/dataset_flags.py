"""The data flags ``evaluate`` and ``cache-logits`` share: ``--data FILE`` or ``--dataset-name``
(``datasets.load_dataset``, as ``dataset_name`` in ``lmkd distill``) with its config, split and
the translation layout's languages."""

from __future__ import annotations

from lmkd.core.errors import LmkdError


def add_data_arguments(p, data_help: str, split: str) -> None:
    """Add the data flags to a command's parser.

    ``--data`` / ``--dataset-name`` (one of them), ``--dataset-config-name``, ``--split`` (default
    ``split``), ``--source-lang`` / ``--target-lang``.

    Args:
        p: the subcommand's ``argparse`` parser.
        data_help: the help text of ``--data``.
        split: ``--split``'s default (e.g. ``validation``).
    """
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--data", help=data_help)
    g.add_argument(
        "--dataset-name",
        help="instead of --data: a dataset read with datasets.load_dataset -- a hub "
        "id (e.g. wmt16), a directory of data files, a .parquet/.json/.jsonl/.csv "
        "file or a save_to_disk dir, e.g. --dataset-name wmt16 "
        f"--dataset-config-name ro-en --split {split}",
    )
    p.add_argument("--dataset-config-name", help="the dataset's configuration (e.g. ro-en)")
    p.add_argument(
        "--split",
        default=split,
        help=f"--dataset-name's split (default {split}; slices like {split}[:500] work)",
    )
    p.add_argument(
        "--source-lang",
        help="rows {'translation': {'en': ..., 'fr': ...}}: the source language, "
        "e.g. --source-lang en --target-lang fr",
    )
    p.add_argument(
        "--target-lang", help="the translation layout's target language (with --source-lang)"
    )


def data_kwargs(ns) -> dict:
    """The DataArguments fields of those flags (make the DataArguments with :func:`dashed`).

    Args:
        ns: the parsed arguments of a command that called :func:`add_data_arguments`.

    Returns:
        ``train_file``, ``dataset_name``, ``dataset_config_name``, ``train_split``,
        ``source_lang`` and ``target_lang``, keyed by field name.

    Raises:
        LmkdError: ``--source-lang`` without ``--target-lang``, or the other way round.
    """
    if bool(ns.source_lang) != bool(ns.target_lang):
        raise LmkdError(
            "--source-lang and --target-lang go together: the keys of the 'translation' column's "
            "languages, e.g. --source-lang en --target-lang fr"
        )
    return {
        "train_file": ns.data,
        "dataset_name": ns.dataset_name,
        "dataset_config_name": ns.dataset_config_name,
        "train_split": ns.split,
        "source_lang": ns.source_lang,
        "target_lang": ns.target_lang,
    }


def dashed(data_args, split_advice: str | None = None):
    """``data_args`` with its errors naming these dashed flags (``--split``, ``--source-lang``, ...)
    instead of distill's keys.

    Args:
        data_args: a :class:`lmkd.data.dataset.DataArguments`; changed in place.
        split_advice: what to do about a split the dataset lacks, for a command without
            ``--split``.

    Returns:
        ``data_args`` itself.
    """
    data_args.dashed_flags = True
    data_args.split_advice = split_advice
    return data_args
