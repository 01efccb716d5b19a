"""The ``lmkd`` command.  Thin: parses arguments and calls the modules that do the work.

Every user mistake (an :class:`~lmkd.core.errors.LmkdError`) is printed as one line on stderr with
exit status 2; ``--debug`` shows the traceback instead.

One module per subcommand (``make_student``, ``distill``, ``evaluate``, ``generate``, ``study``,
``cache_logits``, ``serve_teacher``, ``compress``), each with ``add_parser(subparsers)`` and ``run(namespace)``;
``settings`` turns a recipe YAML plus ``--key value`` overrides into the distill argument dataclasses.  Nothing imports
this package but ``lmkd/__main__.py`` and the ``lmkd`` console script.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from lmkd.cli import (
    cache_logits,
    compress,
    distill,
    evaluate,
    generate,
    make_student,
    serve_teacher,
    study,
)
from lmkd.cli.flags import Parser, one_spelling, shown_options, unknown_message
from lmkd.cli.settings import parse_distill_args, yaml_to_argv
from lmkd.core.errors import LmkdError
from lmkd.train.config import ModelArguments

#: the subcommands, in the order ``lmkd --help`` lists them; each module adds its parser and runs it
COMMANDS = [make_student, distill, evaluate, generate, study, cache_logits, serve_teacher, compress]


def build_parser() -> argparse.ArgumentParser:
    """The ``lmkd`` parser with every subcommand's; each long flag answers to ``--a-b`` and ``--a_b``.

    Returns:
        The parser (:func:`lmkd.cli.flags.one_spelling` applied to the whole tree).
    """
    parser = Parser(
        prog="lmkd",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="lmkd: knowledge distillation for Hugging Face language models.",
        epilog="examples:\n  lmkd make-student --teacher my-teacher --output my-student\n"
        "  lmkd distill recipes/translation/marian_word_kd.yaml\n"
        "Each command has its own --help with examples.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument(
        "--version",
        action="version",
        version=f"lmkd {version()}",
        help="print lmkd's version and exit (e.g. `lmkd --version`)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return one_spelling(parser)


def subcommand_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` of :func:`build_parser`'s ``parser``.

    Args:
        parser: the ``lmkd`` parser.
        name: a subcommand, e.g. ``evaluate``.

    Returns:
        Its parser.
    """
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def version() -> str:
    """lmkd's installed version (its package metadata), or a note when it runs uninstalled."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("lmkd")
    except PackageNotFoundError:
        return "(not installed: run `pip install -e .` for its version)"


def main(argv: list[str] | None = None) -> int:
    """Run one ``lmkd`` command line: parse it, run the subcommand, and turn an :class:`LmkdError`
    into one line on stderr (``--debug`` re-raises it with its traceback instead).

    Args:
        argv: the arguments after ``lmkd`` (default ``sys.argv[1:]``); ``--debug`` anywhere in them
            is taken out and kept as ``ns.debug``.

    Returns:
        The exit status: 0 on success, 2 for no command or an lmkd error, 130 after Ctrl-C (with
        what to run to resume on stderr).
    """
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
        command = subcommand_parser(parser, ns.command)
        command.error(unknown_message(rest, shown_options(command)))
    ns.overrides = rest
    ns.argv = argv  # the command line as given (the model card of `lmkd distill` records it)
    # transformers' per-tensor "Loading weights" bars are noise around lmkd's own progress and errors
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.basicConfig(
        level=logging.INFO if not os.environ.get("LMKD_QUIET") else logging.WARNING,
        format="%(message)s",
    )
    try:
        ns.func(ns)
        end_distributed()
    except LmkdError as e:
        if ns.debug:
            raise
        print(f"lmkd {ns.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"lmkd {ns.command}: interrupted; {interrupted_hint(ns.command, argv, getattr(ns, 'output_dir', None))}",
            file=sys.stderr,
        )
        return 130
    return 0


def end_distributed() -> None:
    """Destroy the process group of a multi-process run (accelerate launch, torchrun) before the
    interpreter exits: left to interpreter teardown, gloo's worker threads can abort the process
    (SIGABRT, "terminate called without an active exception") after the run finished and saved."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from accelerate import PartialState

        PartialState().destroy_process_group()


def interrupted_hint(command: str, argv: list[str], output_dir: str | None = None) -> str:
    """What to run after Ctrl-C.

    The command that really resumes (``distill`` needs ``--resume``, and must drop
    ``--overwrite``, which would start again; ``generate`` and ``cache-logits`` must drop
    ``--overwrite``), or -- a distill run that saved no checkpoint in ``output_dir`` yet, where
    ``--resume`` would be refused -- the command that starts it again.

    Args:
        command: the subcommand that was interrupted (``distill``, ``generate``, ...).
        argv: the command line as given (without ``--debug``).
        output_dir: the run's output directory, where the command has one.

    Returns:
        A hint to print after "interrupted; ".
    """
    if command == "distill":
        from lmkd.cli.distill import held_run
        from lmkd.train.run import resumable

        if output_dir is not None and not resumable(output_dir):
            again = [a for a in argv if a != "--resume"]
            if (
                held_run(output_dir) and "--overwrite" not in again
            ):  # a half-saved student would refuse it
                again.append("--overwrite")
            return (
                f"no checkpoint was saved in {output_dir} yet, so there is nothing to resume; start again "
                f"with: lmkd {shlex.join(again)}"
            )
        again = [a for a in argv if a != "--overwrite"]
        if "--resume" not in again:
            again.append("--resume")
        return f"continue from the last saved checkpoint with: lmkd {shlex.join(again)}"
    if command in ("generate", "cache-logits", "study"):  # these resume when run again as they were
        if "--overwrite" in argv:  # ... but not with --overwrite, which discards what was done
            again = [a for a in argv if a != "--overwrite"]
            return f"resume with the same command without --overwrite: lmkd {shlex.join(again)}"
        return "re-run the same command to resume"
    return "nothing was written; re-run the same command to start again"
