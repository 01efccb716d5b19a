"""The regime keys of DistillationConfig and the check that a trainer class runs the ones turned on.

:data:`REGIME_RUNNERS` names, per key, whether the config turns the regime on and who runs it;
:func:`check_regimes_run` (called by :class:`lmkd.train.trainer.DistillationTrainer` when it is
built) refuses a regime the trainer class would silently ignore.
"""

from __future__ import annotations

from lmkd.core.errors import LmkdError
from lmkd.train.config import DistillationConfig

#: the regime keys of DistillationConfig a trainer class must run or refuse:
#: key -> (whether the config turns the regime on, who runs it)
REGIME_RUNNERS = {
    "on_policy_fraction": (
        lambda a: a.on_policy_fraction > 0,
        "OnPolicyDistillationTrainer (lmkd.train.regimes)",
    ),
    "cohort_size": (lambda a: a.cohort_size > 1, "CoDistillationTrainer (lmkd.train.regimes)"),
    "rounds": (
        lambda a: a.rounds > 1,
        "a loop of whole runs: lmkd.train.run.run_distill (or `lmkd distill`), "
        "which runs lmkd.train.regimes.run_born_again",
    ),
}


def check_regimes_run(trainer_class: type, args: DistillationConfig) -> None:
    """Refuse, in one line, a regime ``args`` turns on that ``trainer_class`` would silently ignore.

    Args:
        trainer_class: the trainer class being built; its ``regimes_run`` names the keys it runs.
        args: the run's config.

    Raises:
        LmkdError: naming the key, its value and the class or function that runs it.
    """
    for key, (on, runner) in REGIME_RUNNERS.items():
        if on(args) and key not in trainer_class.regimes_run:
            raise LmkdError(
                f"{key} {getattr(args, key)} needs {runner}; {trainer_class.__name__} does "
                "not run that regime (it would train without it)"
            )
