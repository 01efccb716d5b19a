"""``lmkd distill``: train a student from a recipe YAML plus ``--key value`` overrides."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from lmkd.cli.output import print_json, work_on_stderr
from lmkd.cli.settings import distill_parser, parse_distill_args
from lmkd.core.errors import LmkdError

EPILOG = """examples:
  lmkd distill recipes/translation/marian_word_kd.yaml
  lmkd distill config.yaml --kd-alpha 0.9 --kd-temperature 2 --output-dir runs/student
  accelerate launch -m lmkd distill recipes/distilbert/mlm_distil.yaml

regimes beyond one fixed teacher (recipes/regimes/):
  lmkd distill config.yaml --kd-alpha 1                            # KD only: data needs no label column
  lmkd distill config.yaml --transfer-file unlabelled.jsonl        # + unlabelled rows (KD only, no CE)
  lmkd distill config.yaml --teacher-model-name-or-path t1,t2 --teacher-weights 0.7,0.3   # ensemble
  lmkd distill config.yaml --rounds 3                              # born-again: round r teaches r+1
  lmkd distill config.yaml --cohort-size 2                         # co-distillation, no teacher
  lmkd distill config.yaml --kd-loss jsd --on-policy-fraction 0.5  # on-policy KD (GKD)
  lmkd distill config.yaml --teacher-server-url http://gpu-box:8000 --teacher-server vllm  # served

The YAML holds keys of three argument groups (model, data, DistillationConfig -- which includes
every Seq2SeqTrainingArguments field); --key value pairs after it override the YAML.
`lmkd distill --help-keys` lists every key."""


def held_run(output_dir: str) -> list[str]:
    """The files and checkpoints of a run that ``output_dir`` holds.

    Args:
        output_dir: the run's output directory (it need not exist).

    Returns:
        The names of its ``checkpoint-*`` entries, ``distill_results.json``, ``config.json`` and
        ``model.safetensors`` that it holds; empty for a fresh or empty directory.
    """
    if not os.path.isdir(output_dir):
        return []
    return [
        n
        for n in os.listdir(output_dir)
        if n.startswith("checkpoint-")
        or n in ("distill_results.json", "config.json", "model.safetensors")
    ]


def _check_fresh_output(output_dir: str, resume: bool, overwrite: bool) -> None:
    """Refuse to train into a directory that holds another run (its checkpoints would be mixed
    with ours, and its student overwritten) unless the user asks to resume or overwrite."""
    if resume or overwrite:
        return
    held = held_run(output_dir)
    if held:
        raise LmkdError(
            f"output_dir {output_dir} already holds a run ({sorted(held)[0]}); pass --resume to continue "
            "it, --overwrite to replace it, or choose another --output-dir"
        )


#: report_to integration -> (modules it imports, any one will do; the package to pip install), as
#: transformers' is_<name>_available checks; an integration not listed needs the module of its name
REPORT_PACKAGES = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "comet_ml": (("comet_ml",), "comet-ml"),
    "azure_ml": (("azureml",), "azureml-core"),
    "flyte": (("flytekit",), "flytekit"),
    "dagshub": (("dagshub",), "dagshub"),
}


def check_report_to(report_to) -> None:
    """Refuse, before anything loads, a ``report_to`` integration whose package is not installed
    (transformers would raise only when the Trainer is built, as a traceback) or that it does not
    know.

    Args:
        report_to: one integration name, a list of them, or None.

    Raises:
        LmkdError: a name transformers does not know, or one whose package is not installed.
    """
    from importlib.util import find_spec

    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name not in INTEGRATION_TO_CALLBACK:
            raise LmkdError(
                f"report_to {name!r} is not a logging integration; use none, all or one of "
                f"{', '.join(sorted(INTEGRATION_TO_CALLBACK))}"
            )
        modules, package = REPORT_PACKAGES.get(name, ((name,), name))
        if not any(find_spec(m) is not None for m in modules):
            raise LmkdError(
                f"report_to {name} needs the {package} package, which is not installed: "
                f"`pip install {package}`, or pass --report-to none"
            )


def add_parser(sub):
    """Add the ``distill`` subcommand's parser.

    Args:
        sub: the ``lmkd`` parser's subparsers.

    Returns:
        None.
    """
    p = sub.add_parser(
        "distill",
        help="train a student with a frozen teacher (YAML + overrides)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Distil a teacher into a student with DistillationTrainer.",
        epilog=EPILOG,
    )
    p.add_argument(
        "config",
        nargs="?",
        help="recipe YAML (keys of ModelArguments, DataArguments, DistillationConfig)",
    )
    p.add_argument("--help-keys", action="store_true", help="list every accepted key and exit")
    p.add_argument(
        "--resume", action="store_true", help="resume from the last checkpoint in output_dir"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="train even if output_dir holds another run"
    )
    p.set_defaults(func=run, takes_overrides=True)


def run(ns) -> None:
    """Run ``lmkd distill``.

    Args:
        ns: its parsed arguments.

    Returns:
        None.
    """
    if ns.help_keys:
        distill_parser().print_help()
        return
    if not ns.config and not ns.overrides:
        raise LmkdError(
            "distill needs a recipe YAML (or --key value arguments); see `lmkd distill --help`"
        )
    from lmkd.train.run import run_distill
    from lmkd.train.served_steps import check_served_teacher

    model_args, data_args, training_args = parse_distill_args(ns.config, ns.overrides)
    ns.output_dir = training_args.output_dir  # (what Ctrl-C's hint looks in for a checkpoint)
    check_report_to(training_args.report_to)
    _check_fresh_output(training_args.output_dir, ns.resume, ns.overwrite)
    check_served_teacher(model_args, data_args, training_args)  # teacher_server_url: is it there?
    command = "lmkd " + shlex.join(ns.argv)
    with work_on_stderr():  # the Trainer's log dicts: stdout carries the metrics' JSON alone
        metrics = run_distill(
            model_args, data_args, training_args, resume=ns.resume, command=command
        )
    if training_args.process_index == 0:
        print_json(metrics)
        print(f"student saved to {training_args.output_dir}", file=sys.stderr)
