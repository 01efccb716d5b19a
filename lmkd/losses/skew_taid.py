"""DistiLLM's skew KLs and TAID's interpolated target: the losses of
:data:`lmkd.losses.token.PLAIN_KD_LOSSES`, which only the plain path (full logits, autograd)
computes, and :class:`TaidSchedule`, TAID's schedule of ``t`` over training.

Conventions are those of :mod:`lmkd.losses.token`.  This module imports torch only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmkd.losses.rows import kl_from_log_probs, log_mixture, masked_rows

__all__ = ["skew_kl", "skew_reverse_kl", "taid_kl", "TaidSchedule"]


def _skew(log_a: torch.Tensor, log_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Row-wise ``KL(a || alpha * a + (1 - alpha) * b)`` from log-probabilities (the mixture in log
    space, so no probability underflows to a log of 0)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return kl_from_log_probs(log_a, log_b)
    if alpha == 1.0:
        return torch.where(torch.isfinite(log_a), log_a, torch.zeros_like(log_a)).sum(-1) * 0.0
    return kl_from_log_probs(log_a, log_mixture(log_a, log_b, alpha))


def skew_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Skew KL of DistiLLM (Ko et al., ICML 2024, eq. 3): ``KL(p || alpha p + (1 - alpha) q)``.

    ``p`` is the teacher's and ``q`` the student's distribution at temperature ``tau``; the
    gradient flows through the mixture (as DistiLLM's ``skewed_forward_kl``).  ``alpha = 0`` is the
    forward KL ``KL(p || q)``; ``alpha = 1`` is identically 0.  DistiLLM used ``alpha = 0.1``.
    Scaled by ``tau^2`` and summed over positions like :func:`forward_kl`.  DistiLLM's
    ``skewed_forward_kl`` returns the cross-entropy ``-sum p log(mixture)``, this KL plus the teacher's
    entropy: the same gradient, a different value (tests/test_skew_taid.py); lmkd keeps the KL, which
    is 0 when the two agree.

    Args:
        student_logits: ``(..., V)`` student logits.
        teacher_logits: ``(..., V)`` teacher logits, the same shape.
        mask: boolean ``(...)`` of the positions that count (all when None).
        alpha: the teacher's weight in the mixture, in [0, 1].
        temperature: the softmax temperature ``tau`` (> 0).

    Returns:
        The 0-dim float32 (or float64) sum over the masked positions.

    Raises:
        ValueError: a mask whose shape is not the logits' leading shape.
        ValueError: ``alpha`` outside [0, 1].
    """
    log_s = F.log_softmax(masked_rows(student_logits, mask) / temperature, -1)
    log_t = F.log_softmax(masked_rows(teacher_logits, mask) / temperature, -1)
    return _skew(log_t, log_s, alpha).sum() * temperature**2


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    alpha: float = 0.1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Skew reverse KL of DistiLLM (Ko et al., 2024, eq. 3): ``KL(q || (1 - alpha) p + alpha q)``.

    ``p`` the teacher, ``q`` the student (temperature ``tau``, gradient through both places ``q``
    appears).  ``alpha = 0`` is the reverse KL ``KL(q || p)``; ``alpha = 1`` is identically 0.
    Scaled by ``tau^2``, summed over positions.

    Args:
        student_logits: ``(..., V)`` student logits.
        teacher_logits: ``(..., V)`` teacher logits, the same shape.
        mask: boolean ``(...)`` of the positions that count (all when None).
        alpha: the student's weight in the mixture, in [0, 1].
        temperature: the softmax temperature ``tau`` (> 0).

    Returns:
        The 0-dim float32 (or float64) sum over the masked positions.

    Raises:
        ValueError: a mask whose shape is not the logits' leading shape.
        ValueError: ``alpha`` outside [0, 1].
    """
    log_s = F.log_softmax(masked_rows(student_logits, mask) / temperature, -1)
    log_t = F.log_softmax(masked_rows(teacher_logits, mask) / temperature, -1)
    return _skew(log_s, log_t, alpha).sum() * temperature**2


def taid_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    t: float = 1.0,
    temperature: float = 1.0,
) -> torch.Tensor:
    """TAID's objective (Shing et al., ICLR 2025, eq. 2-3): ``KL(p_t || q)`` with the intermediate
    target ``p_t = softmax(((1 - t) * stopgrad(z_s) + t * z_t) / tau)`` -- an interpolation of the
    logits (not of the probabilities), the student's side detached so ``p_t`` is a fixed target.

    ``t = 1`` is the forward KL ``KL(p || q)``; ``t = 0`` is 0 (the student is its own target).  The
    schedule of ``t`` over training is :class:`TaidSchedule`.  Scaled by ``tau^2``, summed over positions.

    Args:
        student_logits: ``(..., V)`` student logits.
        teacher_logits: ``(..., V)`` teacher logits, the same shape.
        mask: boolean ``(...)`` of the positions that count (all when None).
        t: the interpolation parameter, in [0, 1].
        temperature: the softmax temperature ``tau`` (> 0).

    Returns:
        The 0-dim float32 (or float64) sum over the masked positions.

    Raises:
        ValueError: a mask whose shape is not the logits' leading shape.
        ValueError: ``t`` outside [0, 1].
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"TAID t must be in [0, 1], got {t}")
    s = masked_rows(student_logits, mask) / temperature
    z_t = masked_rows(teacher_logits, mask) / temperature
    target = z_t if t == 1.0 else (1 - t) * s.detach() + t * z_t
    kl = kl_from_log_probs(F.log_softmax(target, -1), F.log_softmax(s, -1))
    return kl.sum() * temperature**2


class TaidSchedule:
    """The interpolation parameter ``t`` of :func:`taid_kl` over training (TAID, Shing et al. 2025,
    Algorithm 1, and its reference implementation).

    * linear: ``t(step) = t_start + (t_end - t_start) * step / max_steps``;
    * adaptive (``adaptive=True``): after each optimizer step, with ``delta`` the relative decrease of
      the step's mean TAID loss against the previous step's, ``m <- beta m + (1 - beta) delta`` and
      ``t <- min(t_end, max(t_linear(step), t + alpha * sigmoid(m) * (1 - t)))`` -- never behind the
      linear schedule, faster while the loss falls (the first update, with no change to measure yet, only
      keeps up with linear; the reference code leaves t there).  The paper's defaults: ``alpha = 5e-4``,
      ``beta = 0.99``.

    :meth:`at` gives ``t`` for a batch of optimizer step ``step``; :meth:`observe` records that batch's
    mean loss (the adaptive update of a step happens when the next step's first batch asks).  The
    momentum lives in memory: a resumed run restarts it at 0 (``t`` restarts on the linear schedule).

    Args:
        t_start: ``t`` at step 0.
        t_end: ``t`` at the last step (and the most the adaptive schedule reaches).
        adaptive: use the adaptive schedule.
        alpha: the adaptive step size.
        beta: the momentum of the adaptive update.

    Raises:
        ValueError: not ``0 <= t_start <= t_end <= 1``.
    """

    def __init__(
        self,
        t_start: float = 0.4,
        t_end: float = 1.0,
        adaptive: bool = False,
        alpha: float = 5e-4,
        beta: float = 0.99,
    ):
        if not 0.0 <= t_start <= t_end <= 1.0:
            raise ValueError(f"TAID needs 0 <= t_start <= t_end <= 1, got {t_start}, {t_end}")
        self.t_start, self.t_end, self.adaptive, self.alpha, self.beta = (
            t_start,
            t_end,
            adaptive,
            alpha,
            beta,
        )
        self.t = t_start
        self.momentum = 0.0
        self.prev_loss: float | None = None
        self._step: int | None = None
        self._sum, self._n = 0.0, 0

    def linear(self, step: int, max_steps: int) -> float:
        """The linear schedule at ``step`` of ``max_steps``.

        Args:
            step: the optimizer steps taken.
            max_steps: the run's optimizer steps (unknown when <= 0).

        Returns:
            ``t`` on the linear schedule (``t_start`` when ``max_steps`` is unknown).
        """
        progress = min(1.0, step / max_steps) if max_steps > 0 else 0.0
        return self.t_start + (self.t_end - self.t_start) * progress

    def at(self, step: int, max_steps: int) -> float:
        """``t`` for the batches of optimizer step ``step``.

        Args:
            step: 0-based: the number of optimizer steps already taken.
            max_steps: the run's optimizer steps (unknown when <= 0).

        Returns:
            ``t``; with the adaptive schedule, the first batch of a new step applies the update of the
            steps before it.
        """
        if not self.adaptive:
            self.t = self.linear(step, max_steps)
            return self.t
        if self._step is not None and step != self._step and self._n:
            self._update(self._sum / self._n, step, max_steps)
            self._sum, self._n = 0.0, 0
        self._step = step
        return self.t

    def observe(self, loss: float) -> None:
        """Record the mean TAID loss of one batch of the current step (adaptive schedule only).

        Args:
            loss: the batch's mean TAID loss (a non-finite one is ignored).

        Returns:
            None.
        """
        if self.adaptive and math.isfinite(loss):
            self._sum += loss
            self._n += 1

    def _update(self, loss: float, step: int, max_steps: int) -> None:
        if (
            self.prev_loss is None
        ):  # no change to measure yet: t only keeps up with the linear schedule
            self.prev_loss = loss
            self.t = min(self.t_end, max(self.linear(step, max_steps), self.t))
            return
        delta = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1 - self.beta) * delta
        grow = self.alpha / (1 + math.exp(-self.momentum)) * (1 - self.t)
        self.t = min(self.t_end, max(self.linear(step, max_steps), self.t + grow))
        self.prev_loss = loss
