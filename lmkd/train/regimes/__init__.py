"""Distillation regimes beyond one fixed teacher, on the same trainer, config and CLI.

* **Transfer sets** (unlabelled data): ``kd_alpha: 1`` trains on KD alone; a classification run with
  ``kd_alpha: 1`` never reads the label column (:func:`transfer.unlabelled_data_args`).
  ``transfer_file`` mixes an unlabelled set into a labelled one (classification, causal-lm, mlm): its
  rows get KD but no CE, and the CE is averaged over the labelled rows only
  (:mod:`lmkd.train.regimes.transfer`; the masks: :class:`RegimeTrainer`).  A seq2seq student needs
  target tokens to train on: either give an unlabelled seq2seq transfer set the teacher's outputs with ``lmkd
  generate`` and distil on them (sequence-level KD), or train on the inputs alone on-policy
  (``on_policy_fraction: 1``: the targets are the student's own samples, scored by the teacher).
* **Teacher ensembles**: :class:`lmkd.teacher.ensemble.EnsembleTeacher` averages several teachers' softened
  distributions; ``teacher_model_name_or_path: a,b`` (+ ``teacher_weights``) builds one.
* **Born-again networks** (Furlanello et al. 2018): ``rounds: N`` (:func:`run_born_again`, a
  driver of whole runs, :mod:`lmkd.train.regimes.born_again`).
* **Co-distillation / deep mutual learning** (Zhang et al. 2018): ``cohort_size: K``
  (:mod:`lmkd.train.regimes.cohort`).
* **On-policy KD** (GKD, Agarwal et al. 2024): ``on_policy_fraction: lambda``
  (:mod:`lmkd.train.regimes.on_policy`).
"""

from __future__ import annotations

from lmkd.core.constants import TASK_KIND
from lmkd.train.regimes.base import ON_POLICY, REGIME_KEYS, RegimeTrainer
from lmkd.train.regimes.born_again import run_born_again
from lmkd.train.regimes.cohort import (
    CoDistillationTrainer,
    CohortModel,
    check_cohort_can_differ,
    cohort_paths,
    load_cohort,
)
from lmkd.train.regimes.on_policy import OnPolicyDistillationTrainer, PromptLengthCollator
from lmkd.train.regimes.transfer import (
    LABELLED,
    TransferCollator,
    add_transfer_set,
    read_transfer_set,
    unlabelled_data_args,
)
from lmkd.train.trainer import DistillationTrainer

__all__ = [
    "LABELLED",
    "ON_POLICY",
    "REGIME_KEYS",
    "CoDistillationTrainer",
    "CohortModel",
    "OnPolicyDistillationTrainer",
    "PromptLengthCollator",
    "RegimeTrainer",
    "TransferCollator",
    "add_transfer_set",
    "check_cohort_can_differ",
    "cohort_paths",
    "load_cohort",
    "read_transfer_set",
    "run_born_again",
    "trainer_class",
    "unlabelled_data_args",
    "wrap_collator",
]


def trainer_class(args, data_args=None):
    """The trainer class that runs the regimes ``args`` turns on.

    Args:
        args: the run's DistillationConfig.
        data_args: the run's DataArguments (``transfer_file``), or None.

    Returns:
        CoDistillationTrainer, OnPolicyDistillationTrainer, RegimeTrainer (a transfer set) or
        DistillationTrainer when no regime is on.  (``rounds`` is a loop of whole runs around it:
        :func:`run_born_again`.)
    """
    if args.cohort_size > 1:
        return CoDistillationTrainer
    if args.on_policy_fraction > 0:
        return OnPolicyDistillationTrainer
    if data_args is not None and data_args.transfer_file:
        return RegimeTrainer
    return DistillationTrainer


def wrap_collator(collator, data_args, prompt_lengths: bool = False):
    """The task's collator, wrapped for the regimes' batch keys.

    Args:
        collator: the task's collator (:func:`lmkd.data.collators.collator_for`).
        data_args: the run's DataArguments.
        prompt_lengths: the rows carry their prompt lengths (chat rows, on-policy KD) even
            without a ``prompt_column``.

    Returns:
        ``collator`` in :class:`TransferCollator` when a transfer set is mixed in, and in
        :class:`PromptLengthCollator` when the data name each row's prompt (``prompt_column``,
        or ``prompt_lengths``).
    """
    if data_args.transfer_file:
        collator = TransferCollator(collator, TASK_KIND[data_args.task])
    given = prompt_lengths or getattr(data_args, "prompt_column", None)
    return PromptLengthCollator(collator) if given else collator
