"""How every student of the study stops: :class:`StoppingRule` (the rule, hashed into the stages),
:class:`Plateau` (the rule on a stream of validation values) and :class:`PlateauStopping` (the
transformers callback applying it during training, keeping the best evaluation's weights)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from transformers import TrainerCallback

from lmkd.core.errors import LmkdError
from lmkd.study.plan import Plan, plan_view

#: the validation metric every student is stopped on: the CE against the gold labels that
#: DistillationTrainer logs in evaluation -- comparable across variants, whatever their KD term
STOP_METRIC = "eval_loss_ce"
#: the file each early-stopped training writes into its output dir (see :meth:`PlateauStopping.log`)
TRAIN_LOG = "train_log.json"


@dataclass(frozen=True)
class StoppingRule:
    """Early stopping, the same for every student: evaluate ``metric`` (lower is better) on the
    validation split every ``eval_every`` steps and stop after ``patience`` evaluations in a row
    without an improvement of at least ``min_delta`` on the best so far; the step cap is the
    training's ``max_steps``.

    Args:
        eval_every: steps between two evaluations.
        patience: evaluations in a row without improvement before stopping.
        min_delta: the gain that counts as an improvement.
        metric: the metric (lower is better).
    """

    eval_every: int
    patience: int
    min_delta: float
    metric: str = STOP_METRIC

    @classmethod
    def from_plan(cls, plan: Plan | Mapping[str, Any]) -> StoppingRule:
        """The study's rule.

        Args:
            plan: the study's plan (or a mapping of its keys, :func:`~lmkd.study.plan.plan_view`).

        Returns:
            The rule of its ``eval_every``, ``patience`` and ``min_delta``.
        """
        view = plan_view(plan)
        return cls(eval_every=view.eval_every, patience=view.patience, min_delta=view.min_delta)

    def options(self) -> dict:
        """What a stage's hash must include (a changed rule retrains).

        Returns:
            The rule's fields as a dict.
        """
        return asdict(self)


class Plateau:
    """The stopping rule on a stream of validation values: :meth:`update` each value, in order;
    it returns True once ``patience`` values in a row failed to improve on the best by
    ``min_delta`` (a NaN never improves).  :attr:`best_index` is the value that last improved.

    Args:
        patience: values in a row without improvement before stopping (>= 1).
        min_delta: the gain that counts as an improvement (>= 0).
    """

    def __init__(self, patience: int, min_delta: float):
        if patience < 1 or min_delta < 0:
            raise LmkdError(f"early stopping needs patience >= 1 and min_delta >= 0, got {patience}, {min_delta}")
        self.patience, self.min_delta = patience, min_delta
        self.best: float | None = None
        self.best_index: int | None = None
        self.bad = 0
        self.count = 0

    def update(self, value: float) -> bool:
        """Record ``value``; whether it improved is :attr:`improved`; returns whether to stop.

        Args:
            value: the next validation value.

        Returns:
            Whether to stop.
        """
        self.improved = not math.isnan(value) and (self.best is None or value < self.best - self.min_delta)
        if self.improved:
            self.best, self.best_index, self.bad = value, self.count, 0
        else:
            self.bad += 1
        self.count += 1
        return self.bad >= self.patience


def plateau_stop(values, patience: int, min_delta: float) -> int | None:
    """The index of the evaluation after which :class:`Plateau` stops ``values``, or None when it
    never does (every value seen).

    Args:
        values: the validation values, in order.
        patience: evaluations in a row without improvement before stopping.
        min_delta: the gain that counts as an improvement.

    Returns:
        The index, or None.
    """
    p = Plateau(patience, min_delta)
    for i, v in enumerate(values):
        if p.update(v):
            return i
    return None


class PlateauStopping(TrainerCallback):
    """A transformers callback applying a :class:`StoppingRule` during ``Trainer.train``: records
    every validation evaluation, stops the training on the plateau, keeps a copy of the weights of
    the best evaluation and puts them back into the model at the end of training -- so the saved
    student is the one with the best validation metric, whichever step the rule stopped at (the
    last weights are ``patience`` evaluations past the best, i.e. no better by the rule's own
    measure).  Evaluations after training (``run_distill``'s final ``evaluate``) are not recorded.

    Args:
        rule: the stopping rule.
    """

    def __init__(self, rule: StoppingRule):
        self.rule = rule
        self.plateau = Plateau(rule.patience, rule.min_delta)
        self.curve: list[dict] = []
        self.best_state: dict | None = None
        self.best_step: int | None = None
        self.steps = 0
        self.max_steps = 0
        self.stopped_early = False
        self.training = False

    def on_train_begin(self, args, state, control, **kwargs):
        """From here on, evaluations are recorded.

        Args:
            args: the Trainer's arguments (transformers.TrainerCallback's signature).
            state: the Trainer's state.
            control: the Trainer's control flags.
            **kwargs: the callback's other arguments.
        """
        self.training = True

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        """Record an evaluation, keep the best weights, stop the training on the plateau.

        Args:
            args: the Trainer's arguments (transformers.TrainerCallback's signature).
            state: the Trainer's state.
            control: the Trainer's control flags.
            metrics: the evaluation's metrics.
            model: the model evaluated.
            **kwargs: the callback's other arguments.
        """
        if not self.training:
            return
        if not metrics or self.rule.metric not in metrics:
            raise LmkdError(f"early stopping: the evaluation logged no {self.rule.metric} (it logged "
                            f"{', '.join(sorted(metrics or {})) or 'nothing'}); does the validation data have labels?")
        value = float(metrics[self.rule.metric])
        self.curve.append({"step": int(state.global_step), "metric": value})
        stop = self.plateau.update(value)
        if self.plateau.improved and model is not None:
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            self.best_step = int(state.global_step)
        if stop and state.global_step < state.max_steps:
            control.should_training_stop = True
            self.stopped_early = True

    def on_train_end(self, args, state, control, model=None, **kwargs):
        """Record the steps and put the best evaluation's weights back into the model.

        Args:
            args: the Trainer's arguments (transformers.TrainerCallback's signature).
            state: the Trainer's state.
            control: the Trainer's control flags.
            model: the model trained.
            **kwargs: the callback's other arguments.
        """
        self.training = False
        self.steps, self.max_steps = int(state.global_step), int(state.max_steps)
        if self.best_state is not None and model is not None and self.best_step != self.steps:
            model.load_state_dict(self.best_state)
        self.best_state = None  # free the copy

    def log(self) -> dict:
        """``train_log.json``: ``steps`` trained, ``stopped_early``, the validation ``curve``
        (``[{"step", "metric"}]``) of ``metric``, and the rule, the cap and the kept (best) step.

        Returns:
            The log.
        """
        best = self.plateau.best
        return {"steps": self.steps, "stopped_early": self.stopped_early, "curve": self.curve,
                "metric": self.rule.metric, "kept": "best", "best_step": self.best_step,
                "best_metric": best, "max_steps": self.max_steps, "eval_every": self.rule.eval_every,
                "patience": self.rule.patience, "min_delta": self.rule.min_delta}
