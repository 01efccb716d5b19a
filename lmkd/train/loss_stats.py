"""The values that cross the seam between the trainer and its loss: counts in, statistics out.

* :class:`LossCounts` -- how many positions (and, with feature losses, tokens per layer stack and
  examples) each loss term is normalised by in the whole accumulated, all-process batch.  It is
  what :meth:`lmkd.DistillationTrainer.get_batch_samples` returns as the HF Trainer's
  ``num_items_in_batch`` and what ``compute_loss`` receives under that name.
* :class:`LossStats` -- the running sums of the logged loss terms (``loss_ce``, ``loss_kd``,
  ``taid_t``, ``loss_<feature term>``) of one mode, a :class:`RunningMean` per term.
* :class:`ObjectiveInputs` -- what :class:`lmkd.train.objective.DistillationObjective` is given for
  one micro-batch (never the trainer).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import torch


class LossCounts(NamedTuple):
    """The normalising counts of an accumulated batch, summed over micro-batches and processes.

    Attributes:
        ce: positions of the hard-label CE term.
        kd: positions of the KD term.
        features: with feature losses, the tokens per layer stack and the ``examples``
            (:meth:`lmkd.train.features.FeatureDistiller.count_items`); None without them.
    """

    ce: int
    kd: int
    features: dict[str, int] | None = None


@dataclass
class RunningMean:
    """A sum and a count, whose ratio is logged.

    Attributes:
        total: the running sum.
        count: what it is averaged over.
    """

    total: float = 0.0
    count: float = 0.0

    def add(self, total: float, count: float = 1) -> None:
        """Add ``total`` over ``count`` items.

        Args:
            total: the sum to add.
            count: the items it sums over.
        """
        self.total += total
        self.count += count

    @property
    def mean(self) -> float | None:
        """The running mean (None when nothing was added)."""
        return self.total / self.count if self.count else None


def _mean() -> RunningMean:
    return RunningMean()


@dataclass
class LossStats:
    """The logged loss terms of one mode (train or eval), one :class:`RunningMean` per term.

    Attributes:
        ce: the CE per position.
        kd: the KD divergence per position.
        taid_t: TAID's interpolation ``t`` per micro-batch (``kd_loss: taid``).
        hidden: the hidden-state term per micro-batch.
        attention: the attention term per micro-batch.
        relation: the relation term per micro-batch.
    """

    ce: RunningMean = field(default_factory=_mean)
    kd: RunningMean = field(default_factory=_mean)
    taid_t: RunningMean = field(default_factory=_mean)
    hidden: RunningMean = field(default_factory=_mean)
    attention: RunningMean = field(default_factory=_mean)
    relation: RunningMean = field(default_factory=_mean)

    def add(self, other: LossStats) -> None:
        """Add every term of ``other`` to this one's.

        Args:
            other: the statistics of one micro-batch (or of several).
        """
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            mine.add(theirs.total, theirs.count)

    def reset(self) -> None:
        """Set every term back to nothing added (after a log)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, RunningMean())

    def logs(self, prefix: str = "") -> dict[str, float]:
        """The terms added so far, as the trainer logs them (rounded to 6 decimals).

        Args:
            prefix: ``"eval_"`` for the evaluation's terms, else ``""``.

        Returns:
            ``{prefix + "loss_ce": ..., prefix + "loss_kd": ..., prefix + "taid_t": ...,
            prefix + "loss_<feature term>": ...}`` for the terms with anything added.
        """
        out = {}
        for f in dataclasses.fields(self):
            mean = getattr(self, f.name).mean
            if mean is not None:
                out[prefix + (f.name if f.name == "taid_t" else f"loss_{f.name}")] = round(mean, 6)
        return out


@dataclass
class ObjectiveInputs:
    """One micro-batch as :class:`lmkd.train.objective.DistillationObjective` reads it.

    Attributes:
        batch: the collated batch (labels, and the keys of a logit cache or a cross-tokenizer teacher).
        student_forward: the keywords of the student's forward.
        teacher_forward: the keywords of the live teacher's forward (None without one).
        ce_mask: the CE positions (after the causal shift), None when no CE is taken.
        kd_mask: the KD positions (after the causal shift).
        step: the optimizer step and the run's max_steps (TAID's schedule reads them).
    """

    batch: dict
    student_forward: dict
    teacher_forward: dict | None
    ce_mask: torch.Tensor | None
    kd_mask: torch.Tensor
    step: tuple[int, int] = (0, 0)

    def local_counts(self) -> LossCounts:
        """This micro-batch's own counts, for a loss computed without the accumulated batch's.

        Returns:
            The CE and KD positions of this micro-batch.
        """
        return LossCounts(
            int(self.ce_mask.sum()) if self.ce_mask is not None else 0, int(self.kd_mask.sum())
        )
