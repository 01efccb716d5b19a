"""Born-again networks (Furlanello et al. 2018): ``rounds: N``, a loop of whole runs.

Round r's student is the teacher of round r + 1; :func:`run_born_again` drives the rounds and is
given the one-run function (:func:`lmkd.train.run.run_distill`), so it does not import the module
that calls it.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil

from lmkd.core.io import atomic_write_json
from lmkd.train import card
from lmkd.train.card import RESULTS_NAME

logger = logging.getLogger(__name__)


def has_checkpoint(output_dir: str) -> bool:
    """Whether ``output_dir`` holds a ``checkpoint-N`` the Trainer can resume from.

    Args:
        output_dir: a run's output directory (it need not exist).

    Returns:
        True when the directory exists and holds a checkpoint.
    """
    from transformers.trainer_utils import get_last_checkpoint

    return os.path.isdir(output_dir) and bool(get_last_checkpoint(output_dir))


def rounds_to_resume(output_dir: str) -> bool:
    """Whether ``output_dir`` holds a born-again ``round-r`` that finished or holds a checkpoint.

    Args:
        output_dir: the whole run's output directory.

    Returns:
        True when ``--resume`` has a round to keep or continue there.
    """
    if not os.path.isdir(output_dir):
        return False
    rounds = [os.path.join(output_dir, n) for n in os.listdir(output_dir) if n.startswith("round-")]
    return any(os.path.isfile(os.path.join(r, RESULTS_NAME)) or has_checkpoint(r) for r in rounds)


def run_born_again(
    run_one,
    model_args,
    data_args,
    args,
    resume: bool = False,
    teacher_model=None,
    command: str | None = None,
) -> dict:
    """``rounds: N``: N runs of ``run_one`` (:func:`lmkd.train.run.run_distill`), each from the same
    student init; round 1 learns
    from the given teacher (or, with none, from the labels alone -- the born-again "teacher"
    generation), round r > 1 from round r-1's student.  Round r writes ``output_dir/round-r``
    (trained student, tokenizer, metrics; evaluated on validation_file when given); the last
    round's student is also copied into ``output_dir``, with a card and settings of the whole run
    (each round's own are in its directory).  With ``--resume`` finished rounds are kept and the
    interrupted one resumes from its last checkpoint.

    Args:
        run_one: the one-run function, called as ``run_one(model_args, data_args, args, resume=...,
            teacher_model=..., command=...)`` with ``args.rounds == 1``; returns its metrics.
        model_args: the student (``lmkd.train.config.ModelArguments``).
        data_args: the data (``lmkd.data.dataset.DataArguments``).
        args: the run's DistillationConfig, ``rounds > 1``.
        resume: keep finished rounds and resume the interrupted one.
        teacher_model: round 1's teacher as a model (else ``args.teacher_model_name_or_path``).
        command: the command line, for the model card.

    Returns:
        The last round's metrics, with every round's under ``"rounds"``.
    """

    rounds, per_round = args.rounds, {}
    previous, metrics = None, {}
    for r in range(1, rounds + 1):
        out = os.path.join(args.output_dir, f"round-{r}")
        a = copy.copy(args)
        a.output_dir, a.rounds = out, 1
        if r > 1:
            a.teacher_model_name_or_path, a.teacher_weights, a.logit_cache = previous, None, None
        elif teacher_model is None and not args.teacher_model_name_or_path and not args.logit_cache:
            logger.info(
                "born-again round 1 has no teacher: it trains on the labels alone (kd_alpha 0)"
            )
            a.kd_alpha, a.hidden_weight, a.attention_weight, a.relation_weight = 0.0, 0.0, 0.0, 0.0
        done = os.path.join(out, RESULTS_NAME)
        if resume and os.path.isfile(done):
            with open(done) as f:
                metrics = json.load(f)
            logger.info("born-again round %d/%d already finished in %s", r, rounds, out)
        else:
            logger.info(
                "born-again round %d/%d -> %s (teacher: %s)",
                r,
                rounds,
                out,
                "given model"
                if r == 1 and teacher_model is not None
                else a.teacher_model_name_or_path
                if a.kd_alpha > 0
                else "none",
            )
            metrics = run_one(
                model_args,
                data_args,
                a,
                resume=resume and has_checkpoint(out),
                teacher_model=teacher_model if r == 1 else None,
                command=command,
            )
        per_round[f"round-{r}"] = metrics
        previous = out
    final = dict(metrics)
    final["rounds"] = per_round
    if args.should_save:
        for name in os.listdir(previous):
            src = os.path.join(previous, name)
            if os.path.isfile(src) and name != RESULTS_NAME:
                shutil.copy2(src, os.path.join(args.output_dir, name))
        atomic_write_json(
            os.path.join(args.output_dir, RESULTS_NAME), final, indent=1, sort_keys=True
        )
        card.write_card(
            args.output_dir,
            model_args,
            data_args,
            args,
            metrics,
            command=command,
            teacher="a model passed from Python"
            if teacher_model is not None and not args.teacher_model_name_or_path
            else None,
        )
    return final
