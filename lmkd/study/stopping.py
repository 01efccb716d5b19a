"""How every student of the study stops: :class:`StoppingRule` (the rule, hashed into the stages),
:class:`Plateau` (the rule on a stream of validation values) and :class:`PlateauStopping` (the
transformers callback applying it during training, keeping the best evaluation's weights)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

from transformers import TrainerCallback

from lmkd.core.errors import LmkdError
from lmkd.study.plan import Plan, plan_view

#: the validation CE against the gold labels that DistillationTrainer logs in evaluation: what a stage
#: with no task metric stops on (MLM distillation)
STOP_METRIC = "eval_loss_ce"
#: what each task's students stop on: ``(logged metric, greater is better)``.  The task metric of the
#: students' own greedy outputs on the validation rows, scored against the gold references as the
#: report scores the test rows -- not the CE against the gold targets, which measures a student's
#: distance from the baseline's objective: a Seq-KD student learns the teacher's mode, so its gold CE
#: flattens while its outputs still improve (measured on a held-out en->de corpus: Seq-KD stopped by the
#: gold CE at 1,100 steps scored 12.8 BLEU, 17.0 without early stopping).
STOP_METRICS = {
    "translation": ("eval_bleu", True),
    "summarization": ("eval_rougeL", True),
    "classification": ("eval_accuracy", True),
    "causal-lm": (
        "eval_rougeL",
        True,
    ),  # ROUGE-L of the greedy responses (lmkd.study.causal_lm_eval)
    "mlm": (STOP_METRIC, False),
}
#: the file each early-stopped training writes into its output dir (see :meth:`PlateauStopping.log`)
TRAIN_LOG = "train_log.json"


@dataclass(frozen=True)
class StoppingRule:
    """Early stopping, the same for every student of a task: evaluate ``metric`` on the validation
    split every ``eval_every`` steps and stop after ``patience`` evaluations in a row without an
    improvement of at least ``min_delta`` on the best so far; the step cap is the training's
    ``max_steps``.  Evaluations before step ``min_steps`` are recorded (the best weights are kept from
    them too) but never count towards the patience: a from-scratch student's greedy outputs score 0
    BLEU until it has learned to write the target language, and a rule counting those evaluations
    calls that a plateau (measured on fr->en, quick budget: the baseline's validation BLEU was 0.0 at
    steps 100-400 and the rule stopped it at 400, at 0 BLEU, while every other student of that
    corpus left 0 between steps 300 and 500 and reached 19-23 BLEU by 1,500).

    Args:
        eval_every: steps between two evaluations.
        patience: evaluations in a row without improvement before stopping.
        min_delta: the gain that counts as an improvement (in the metric's units).
        metric: the logged metric (e.g. ``eval_bleu``; ``eval_loss_ce`` for the gold CE).
        greater_is_better: whether a larger value of ``metric`` is an improvement.
        min_steps: no stop before this step (the study's: half the cap).
    """

    eval_every: int
    patience: int
    min_delta: float
    metric: str = STOP_METRIC
    greater_is_better: bool = False
    min_steps: int = 0

    @classmethod
    def from_plan(cls, plan: Plan | Mapping[str, Any], task: str = "mlm") -> StoppingRule:
        """The study's rule for the students of ``task`` (:data:`STOP_METRICS`).

        Args:
            plan: the study's plan (or a mapping of its keys, :func:`~lmkd.study.plan.plan_view`).
            task: translation, summarization, classification (their task metric, ``metric_min_delta``
                points) or mlm (the gold CE, ``min_delta`` nats).

        Returns:
            The rule of the plan's ``eval_every`` and ``patience`` on the task's metric, with
            ``min_steps`` half the students' cap (``student_steps``).
        """
        view = plan_view(plan)
        metric, greater = STOP_METRICS[task]
        delta = view.metric_min_delta if greater else view.min_delta
        return cls(
            eval_every=view.eval_every,
            patience=view.patience,
            min_delta=delta,
            metric=metric,
            greater_is_better=greater,
            min_steps=int(getattr(view, "student_steps", 0) or 0) // 2,
        )

    @classmethod
    def for_teacher(cls, plan: Plan | Mapping[str, Any], task: str) -> StoppingRule:
        """The rule of a teacher trained here: the students' rule (:meth:`from_plan`), its cap the
        teacher's (``teacher_steps``), no stop before half of it.  A teacher trained for a fixed number
        of steps was not the strongest model the recipe makes (measured on the demo: the 1,500-step
        teacher scored 27.8 BLEU beam, a 22% student trained to its plateau 32.6; trained 4,500 steps
        the teacher scored 38.7), and a teacher its students can beat is not the one Kim & Rush
        distilled.

        Args:
            plan: the study's plan (or a mapping of its keys).
            task: the study's task.

        Returns:
            The rule with ``min_steps`` half ``teacher_steps``.
        """
        view = plan_view(plan)
        rule = cls.from_plan(plan, task)
        return replace(rule, min_steps=int(getattr(view, "teacher_steps", 0) or 0) // 2)

    @property
    def generates(self) -> bool:
        """Whether the metric scores generated outputs (the evaluation must generate).

        Returns:
            True for BLEU / ROUGE.
        """
        return self.metric in (
            "eval_bleu",
            "eval_chrf",
            "eval_rouge1",
            "eval_rouge2",
            "eval_rougeL",
        )

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
        greater_is_better: whether larger values are better (a task metric) or smaller (a loss).
    """

    def __init__(self, patience: int, min_delta: float, greater_is_better: bool = False):
        if patience < 1 or min_delta < 0:
            raise LmkdError(
                f"early stopping needs patience >= 1 and min_delta >= 0, got {patience}, {min_delta}"
            )
        self.patience, self.min_delta, self.greater_is_better = (
            patience,
            min_delta,
            greater_is_better,
        )
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
        better = self.best is None or (
            value > self.best + self.min_delta
            if self.greater_is_better
            else value < self.best - self.min_delta
        )
        self.improved = not math.isnan(value) and better
        if self.improved:
            self.best, self.best_index, self.bad = value, self.count, 0
        else:
            self.bad += 1
        self.count += 1
        return self.bad >= self.patience


def plateau_stop(
    values, patience: int, min_delta: float, greater_is_better: bool = False
) -> int | None:
    """The index of the evaluation after which :class:`Plateau` stops ``values``, or None when it
    never does (every value seen).

    Args:
        values: the validation values, in order.
        patience: evaluations in a row without improvement before stopping.
        min_delta: the gain that counts as an improvement.
        greater_is_better: whether larger values are better.

    Returns:
        The index, or None.
    """
    p = Plateau(patience, min_delta, greater_is_better)
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
        self.plateau = Plateau(rule.patience, rule.min_delta, rule.greater_is_better)
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
            raise LmkdError(
                f"early stopping: the evaluation logged no {self.rule.metric} (it logged "
                f"{', '.join(sorted(metrics or {})) or 'nothing'}); does the validation data have labels?"
            )
        value = float(metrics[self.rule.metric])
        point = {"step": int(state.global_step), "metric": value}
        if (
            self.rule.metric != STOP_METRIC and STOP_METRIC in metrics
        ):  # the gold CE too, for the report's curves
            point["loss_ce"] = float(metrics[STOP_METRIC])
        self.curve.append(point)
        stop = self.plateau.update(value)
        if state.global_step < self.rule.min_steps:  # too early to call a plateau
            self.plateau.bad, stop = 0, False
        if self.plateau.improved and model is not None:
            self.best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
            }
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
        return {
            "steps": self.steps,
            "stopped_early": self.stopped_early,
            "curve": self.curve,
            "metric": self.rule.metric,
            "kept": "best",
            "best_step": self.best_step,
            "best_metric": best,
            "max_steps": self.max_steps,
            "eval_every": self.rule.eval_every,
            "patience": self.rule.patience,
            "min_delta": self.rule.min_delta,
            "greater_is_better": self.rule.greater_is_better,
        }


def read_train_log(model: dict) -> dict | None:
    """A trained model's ``train_log.json`` (its ``train_log`` path, else the file in its stage dir), or
    None when there is none or it is not the documented shape (:meth:`PlateauStopping.log`).

    Args:
        model: a model entry (``train_log`` or ``dir``).

    Returns:
        ``{"steps", "stopped_early", "best_step", "curve", "metric", "greater_is_better"}``, or None.
    """
    path = model.get("train_log") or os.path.join(model["dir"], TRAIN_LOG)
    try:
        with open(path) as f:
            log = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(log, dict) or not isinstance(log.get("steps"), int):
        return None
    curve = [
        c for c in log.get("curve") or [] if isinstance(c, dict) and "step" in c and "metric" in c
    ]
    return {
        "steps": log["steps"],
        "stopped_early": bool(log.get("stopped_early", False)),
        "best_step": log["best_step"] if isinstance(log.get("best_step"), int) else None,
        "curve": curve,
        "metric": str(log.get("metric", "validation metric")),
        "greater_is_better": bool(log.get("greater_is_better", False)),
    }
