"""Distill settings: a recipe YAML turned into ``--key value`` arguments and parsed, with overrides,
into (ModelArguments, DataArguments, DistillationConfig); unknown keys get a did-you-mean hint.
"""

from __future__ import annotations

import difflib
import json
import os
from dataclasses import fields

from lmkd.cli.flags import (
    OneActionPerAbbreviation,
    did_you_mean,
    one_spelling,
    shown_options,
)
from lmkd.core.errors import LmkdError


def distill_parser():
    """The HfArgumentParser of the three distill argument groups, each key answering to ``--kd-alpha``
    and ``--kd_alpha`` and shown dashed (:func:`lmkd.cli.flags.one_spelling`).

    Returns:
        The parser.
    """
    from transformers import HfArgumentParser

    from lmkd.data.dataset import DataArguments
    from lmkd.train.config import DistillationConfig, ModelArguments

    class DistillParser(OneActionPerAbbreviation, HfArgumentParser):
        """HfArgumentParser; one flag's two spellings are not an ambiguity."""

    parser = DistillParser((ModelArguments, DataArguments, DistillationConfig), prog="lmkd distill")
    return one_spelling(parser)


#: the flags of `lmkd distill` itself (beside the keys), which may sit among the overrides
DISTILL_OWN_FLAGS = ("--help-keys", "--resume", "--overwrite")


def _known_keys() -> dict[str, str]:
    from lmkd.data.dataset import DataArguments
    from lmkd.train.config import DistillationConfig, ModelArguments

    return {
        f.name: cls.__name__
        for cls in (ModelArguments, DataArguments, DistillationConfig)
        for f in fields(cls)
    }


def yaml_to_argv(path: str) -> list[str]:
    """Turn a recipe YAML into ``--key value`` arguments, rejecting unknown keys with a hint.

    A boolean becomes ``true``/``false``, a list several values, a mapping its JSON, a None value
    is left out, and a value starting with ``-`` is joined as ``--key=value``.

    Args:
        path: the recipe YAML file.

    Returns:
        The arguments, in the file's order.

    Raises:
        LmkdError: the file is missing, not valid YAML, not a mapping, or has an unknown key.
    """
    import yaml

    if not os.path.isfile(path):
        raise LmkdError(
            f"config file {path} does not exist; pass a YAML file such as recipes/…/*.yaml"
        )
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise LmkdError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, dict):
        raise LmkdError(f"{path} must be a mapping of key: value lines")
    known = _known_keys()
    argv: list[str] = []
    for key, value in data.items():
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = (
                f"; did you mean {close[0]!r}?"
                if close
                else "; `lmkd distill --help-keys` lists them"
            )
            raise LmkdError(f"{path}: unknown key {key!r}{hint}")
        argv.append(f"--{key}")
        if isinstance(value, bool):
            argv.append(str(value).lower())
        elif isinstance(value, (list, tuple)):
            argv.extend(str(v) for v in value)
        elif isinstance(value, dict):
            argv.append(json.dumps(value))
        elif value is None:
            argv.pop()
        elif str(value).startswith(
            "-"
        ):  # e.g. layer_map "-1:-1": argparse would take it for an option
            argv[-1] += f"={value}"
        else:
            argv.append(str(value))
    return argv


def parse_distill_args(config: str | None, overrides: list[str]):
    """(model_args, data_args, training_args) from a YAML file plus ``--key value`` overrides.

    Args:
        config: the recipe YAML (None: the overrides alone).
        overrides: ``--key value`` arguments, each key as ``--kd-alpha`` or ``--kd_alpha``.

    Returns:
        ``(ModelArguments, DataArguments, DistillationConfig)``.
    """
    parser = distill_parser()
    for tok in overrides:
        flag = tok.split("=")[0]
        if tok.startswith("--") and flag not in parser._option_string_actions:
            meant = did_you_mean(flag, shown_options(parser) + list(DISTILL_OWN_FLAGS))
            raise LmkdError(
                f"unknown option {flag}"
                + (f"; did you mean {meant}?" if meant else "")
                + " (`lmkd distill --help-keys` lists them)"
            )
    argv = yaml_to_argv(config) if config else []

    def one_line(message):  # argparse would print the whole usage (every key) before its message
        raise LmkdError(f"{message} (see `lmkd distill --help-keys`)")

    parser.error = one_line
    try:
        return parser.parse_args_into_dataclasses(args=argv + list(overrides))
    except SystemExit as e:  # argparse printed something and exited (e.g. --help among the keys)
        raise LmkdError("invalid distill arguments (see the message above)") from e
    except LmkdError:
        raise
    except (
        ValueError
    ) as e:  # TrainingArguments' own checks, e.g. bf16 on a machine without a bf16 GPU
        raise LmkdError(
            f"invalid distill arguments: {str(e).splitlines()[0]} (override the recipe's key on "
            "the command line, e.g. --bf16 false --use-cpu true on a CPU)"
        ) from e
