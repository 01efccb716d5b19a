"""The ``lmkd`` command.  Thin: parses arguments and calls the modules that do the work.

Every user mistake (an :class:`~lmkd.errors.LmkdError`) is printed as one line on stderr with
exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, fields

from .errors import LmkdError

EPILOG_DISTILL = """examples:
  lmkd distill recipes/translation/marian_word_kd.yaml
  lmkd distill config.yaml --kd_alpha 0.9 --kd_temperature 2 --output_dir runs/student
  accelerate launch -m lmkd distill recipes/distilbert/mlm_distil.yaml

The YAML holds keys of the three argument groups below (model, data, DistillationConfig -- which
includes every Seq2SeqTrainingArguments field); --key value pairs after it override the YAML.
Run `lmkd distill --help-keys` to list every key."""


@dataclass
class ModelArguments:
    """Which student to train (the teacher is a DistillationConfig field)."""

    student_model_name_or_path: str = field(
        metadata={"help": "Student checkpoint (hub id or local dir), e.g. one written by `lmkd make-student`."})
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Tokenizer to use (default: the student's)."})


# ---- helpers ------------------------------------------------------------------------------------


def atomic_output_dir(final: str, overwrite: bool = False):
    """Context manager: yields a temp dir next to ``final`` that is renamed to ``final`` on success
    and removed on failure, so a failed command leaves no partial output behind."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        if os.path.exists(final) and os.listdir(final) and not overwrite:
            raise LmkdError(f"output directory {final} already exists and is not empty; choose another "
                            "--output or pass --overwrite")
        parent = os.path.dirname(os.path.abspath(final))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(final) + "-", dir=parent)
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)

    return cm()


def _layer_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"layer list must be integers like '0,2,4', got {text!r}") from e


# ---- make-student -------------------------------------------------------------------------------


def _add_make_student(sub):
    p = sub.add_parser(
        "make-student", help="build a smaller student by copying teacher layers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Copy chosen teacher layers into a smaller student (DistilBERT / shrink-and-fine-tune).",
        epilog="examples:\n  lmkd make-student --teacher bert-base-uncased --output students/bert6\n"
               "  lmkd make-student --teacher facebook/bart-large-cnn --output students/bart-12-3 "
               "--encoder-layers 0-11 --decoder-layers 0,6,11\n"
               "Unspecified stacks keep every other layer (0,2,4,...).")
    p.add_argument("--teacher", required=True, help="teacher checkpoint (hub id or local dir)")
    p.add_argument("--output", required=True, help="directory to write the student (and tokenizer) to")
    p.add_argument("--layers", type=_layer_list, help="teacher layers to keep, single-stack models (BERT, GPT-2)")
    p.add_argument("--encoder-layers", type=_layer_list, help="encoder layers to keep (T5, BART, Marian)")
    p.add_argument("--decoder-layers", type=_layer_list, help="decoder layers to keep (T5, BART, Marian)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_run_make_student)


def _run_make_student(ns) -> None:
    from .modeling import kind_from_config, load_model, load_tokenizer
    from .student import count_parameters, make_student

    teacher = load_model(ns.teacher, kind=kind_from_config(ns.teacher))
    tokenizer = load_tokenizer(ns.teacher, required=False)
    student = make_student(teacher, layers=ns.layers, encoder_layers=ns.encoder_layers,
                           decoder_layers=ns.decoder_layers)
    with atomic_output_dir(ns.output, ns.overwrite) as tmp:
        student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    nt, ns_ = count_parameters(teacher), count_parameters(student)
    print(f"student: {ns_:,} parameters ({ns_ / nt:.0%} of the teacher's {nt:,}); layers "
          f"{json.dumps(student.config.lmkd_layer_map)} -> {ns.output}")


# ---- distill ------------------------------------------------------------------------------------


def _distill_parser():
    from transformers import HfArgumentParser

    from .config import DistillationConfig
    from .data import DataArguments

    return HfArgumentParser((ModelArguments, DataArguments, DistillationConfig))


def _known_keys() -> dict[str, str]:
    from .config import DistillationConfig
    from .data import DataArguments

    return {f.name: cls.__name__ for cls in (ModelArguments, DataArguments, DistillationConfig) for f in fields(cls)}


def yaml_to_argv(path: str) -> list[str]:
    """Turn a recipe YAML into ``--key value`` arguments, rejecting unknown keys with a hint."""
    import yaml

    if not os.path.isfile(path):
        raise LmkdError(f"config file {path} does not exist; pass a YAML file such as recipes/…/*.yaml")
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
            hint = f"; did you mean {close[0]!r}?" if close else "; `lmkd distill --help-keys` lists them"
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
        else:
            argv.append(str(value))
    return argv


def parse_distill_args(config: str | None, overrides: list[str]):
    """(model_args, data_args, training_args) from a YAML file plus ``--key value`` overrides."""
    argv = yaml_to_argv(config) if config else []
    known = _known_keys()
    for tok in overrides:
        if tok.startswith("--") and tok[2:].split("=")[0] not in known:
            key = tok[2:].split("=")[0]
            close = difflib.get_close_matches(key, known, n=1)
            raise LmkdError(f"unknown option --{key}" + (f"; did you mean --{close[0]}?" if close else ""))
    parser = _distill_parser()
    try:
        return parser.parse_args_into_dataclasses(args=argv + list(overrides))
    except SystemExit as e:  # argparse already printed its message
        raise LmkdError("invalid distill arguments (see the message above)") from e


def _add_distill(sub):
    p = sub.add_parser("distill", help="train a student with a frozen teacher (YAML + overrides)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Distil a teacher into a student with DistillationTrainer.",
                       epilog=EPILOG_DISTILL)
    p.add_argument("config", nargs="?", help="recipe YAML (keys of ModelArguments, DataArguments, DistillationConfig)")
    p.add_argument("--help-keys", action="store_true", help="list every accepted key and exit")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in output_dir")
    p.set_defaults(func=_run_distill, takes_overrides=True)


def _run_distill(ns) -> None:
    if ns.help_keys:
        _distill_parser().print_help()
        return
    if not ns.config and not ns.overrides:
        raise LmkdError("distill needs a recipe YAML (or --key value arguments); see `lmkd distill --help`")
    from .distill import run_distill

    model_args, data_args, training_args = parse_distill_args(ns.config, ns.overrides)
    metrics = run_distill(model_args, data_args, training_args, resume=ns.resume)
    if training_args.process_index == 0:
        print(json.dumps(metrics, indent=1, sort_keys=True))


# ---- main ---------------------------------------------------------------------------------------

COMMANDS = [_add_make_student, _add_distill]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmkd", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="lmkd: knowledge distillation for Hugging Face language models.",
        epilog="examples:\n  lmkd make-student --teacher my-teacher --output my-student\n"
               "  lmkd distill recipes/translation/marian_word_kd.yaml\n"
               "Each command has its own --help with examples.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    ns, rest = parser.parse_known_args(argv)
    ns.debug = debug
    if ns.command is None:
        parser.print_help()
        return 2
    if rest and not getattr(ns, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    ns.overrides = rest
    logging.basicConfig(level=logging.INFO if not os.environ.get("LMKD_QUIET") else logging.WARNING,
                        format="%(message)s")
    try:
        ns.func(ns)
    except LmkdError as e:
        if ns.debug:
            raise
        print(f"lmkd {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmkd {ns.command}: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
