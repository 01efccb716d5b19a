"""Distillation losses: pure functions over tensors.

Conventions shared by every function here:

* ``student_logits`` / ``teacher_logits`` have shape ``(..., V)``; every leading position is one
  token (or one example for classification).
* ``mask`` is a boolean tensor of the leading shape selecting the positions that count; ``None``
  means all.  :func:`mask_from_labels` builds one from labels that use ``ignore_index``.
* Every loss is **summed** over the selected positions (reduction ``"sum"``).  Callers divide by
  a token count -- the trainer divides by the number of positions in the whole (accumulated,
  all-process) batch, so gradient accumulation gives the gradient of one big batch.
* :data:`KD_LOSSES` go through every path of lmkd (plain, chunked, fused, cached top-K);
  :data:`PLAIN_KD_LOSSES` (skew KL, skew reverse KL, TAID) only through the plain one.
* Softmaxes are taken in float32 whatever the input dtype, so fp16/bf16 logits and logits of
  +-1e4 stay finite; a batch where every position is masked gives exactly 0 with a 0 gradient.

This module imports torch only; it knows nothing of models or trainers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lmkd.core.constants import IGNORE_INDEX

#: names every KD path accepts (plain, chunked/fused; ``TOPK_KD_LOSSES`` of them with a top-K cache)
KD_LOSSES = ("forward_kl", "reverse_kl", "jsd", "mse")
#: names only the plain path (full logits, autograd) computes: skew KL / skew reverse KL (DistiLLM)
#: and TAID's interpolated target
PLAIN_KD_LOSSES = ("skew_kl", "skew_reverse_kl", "taid")

__all__ = [
    "IGNORE_INDEX",
    "KD_LOSSES",
    "PLAIN_KD_LOSSES",
    "mask_from_labels",
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "skew_kl",
    "skew_reverse_kl",
    "taid_kl",
    "TaidSchedule",
    "logit_mse",
    "cross_entropy",
    "token_kd_loss",
    "hinton_loss",
    "at_least_float32",
]


def mask_from_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Boolean mask of the positions whose label is not ``ignore_index``.

    Args:
        labels: the label ids.
        ignore_index: the label of positions that count in no loss.

    Returns:
        A bool tensor of ``labels``' shape.
    """
    return labels.ne(ignore_index)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` up-cast to float32 when it is half precision (bf16/fp16); float32 and float64 stay as
    they are.  Every loss of :mod:`lmkd.losses` computes in this dtype.

    Args:
        x: a tensor.

    Returns:
        ``x`` in float32, or as it was when already float32/float64.
    """
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def masked_rows(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Flatten to ``(N, V)`` keeping only the masked positions, in at least float32 (every token-level
    loss here and in :mod:`lmkd.losses.uld` reads its logits through this).

    Args:
        logits: ``(..., V)`` logits.
        mask: boolean ``(...)`` of the positions to keep (all when None).

    Returns:
        ``(N, V)``: the kept positions' rows.

    Raises:
        ValueError: the mask's shape is not the logits' leading shape.
    """
    v = logits.shape[-1]
    if mask is not None:
        if mask.shape != logits.shape[:-1]:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match logits {tuple(logits.shape[:-1])}"
            )
        logits = logits[mask.to(torch.bool)]
    return at_least_float32(logits.reshape(-1, v))


def _kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(p || q) from log-probabilities, 0 where p is 0 (also against -inf)."""
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * diff).sum(-1)


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Hinton's soft-target loss ``tau^2 * KL(p_t^tau || p_s^tau)``, summed over positions.

    The ``tau^2`` factor keeps the gradient magnitude independent of the temperature
    (Hinton et al., 2015, section 2).

    Args:
        student_logits: ``(..., V)`` student logits.
        teacher_logits: ``(..., V)`` teacher logits, the same shape.
        mask: boolean ``(...)`` of the positions that count (all when None).
        temperature: the softmax temperature ``tau`` (> 0).

    Returns:
        The 0-dim float32 (or float64) sum over the masked positions.

    Raises:
        ValueError: a mask whose shape is not the logits' leading shape.
    """
    s = masked_rows(student_logits, mask) / temperature
    t = masked_rows(teacher_logits, mask) / temperature
    kl = _kl_from_log_probs(F.log_softmax(t, -1), F.log_softmax(s, -1))
    return kl.sum() * temperature**2


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mode-seeking ``tau^2 * KL(p_s^tau || p_t^tau)``, summed over positions (MiniLLM, GKD).

    Args:
        student_logits: ``(..., V)`` student logits.
        teacher_logits: ``(..., V)`` teacher logits, the same shape.
        mask: boolean ``(...)`` of the positions that count (all when None).
        temperature: the softmax temperature ``tau`` (> 0).

    Returns:
        The 0-dim float32 (or float64) sum over the masked positions.

    Raises:
        ValueError: a mask whose shape is not the logits' leading shape.
    """
    s = masked_rows(student_logits, mask) / temperature
    t = masked_rows(teacher_logits, mask) / temperature
    kl = _kl_from_log_probs(F.log_softmax(s, -1), F.log_softmax(t, -1))
    return kl.sum() * temperature**2


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al., 2024), as TRL defines it.

    With the mixture ``m = beta * p_t + (1 - beta) * p_s``::

        JSD_beta = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)

    ``beta = 0`` is defined as the forward KL ``KL(p_t || p_s)`` and ``beta = 1`` as the reverse KL
    ``KL(p_s || p_t)`` (the interpolation itself vanishes at both ends).  Scaled by ``tau^2``.

    Args:
        student_logits: ``(..., V)`` student logits.
        teacher_logits: ``(..., V)`` teacher logits, the same shape.
        mask: boolean ``(...)`` of the positions that count (all when None).
        beta: the teacher's weight in the mixture, in [0, 1].
        temperature: the softmax temperature ``tau`` (> 0).

    Returns:
        The 0-dim float32 (or float64) sum over the masked positions.

    Raises:
        ValueError: a mask whose shape is not the logits' leading shape.
        ValueError: ``beta`` outside [0, 1].
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, mask, temperature)
    log_s = F.log_softmax(masked_rows(student_logits, mask) / temperature, -1)
    log_t = F.log_softmax(masked_rows(teacher_logits, mask) / temperature, -1)
    log_m = _log_mixture(log_t, log_s, beta)
    jsd = beta * _kl_from_log_probs(log_t, log_m) + (1 - beta) * _kl_from_log_probs(log_s, log_m)
    return jsd.sum() * temperature**2


def _skew(log_a: torch.Tensor, log_b: torch.Tensor, alpha: float) -> torch.Tensor:
    """Row-wise ``KL(a || alpha * a + (1 - alpha) * b)`` from log-probabilities (the mixture in log
    space, so no probability underflows to a log of 0)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"skew alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return _kl_from_log_probs(log_a, log_b)
    if alpha == 1.0:
        return torch.where(torch.isfinite(log_a), log_a, torch.zeros_like(log_a)).sum(-1) * 0.0
    return _kl_from_log_probs(log_a, _log_mixture(log_a, log_b, alpha))


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """``log(w * a + (1 - w) * b)`` from log-probabilities, in log space (0 < w < 1): the mixture
    inside the generalized JSD and the skew KLs."""
    return torch.logsumexp(torch.stack([log_a + math.log(w), log_b + math.log(1 - w)]), dim=0)


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
    kl = _kl_from_log_probs(F.log_softmax(target, -1), F.log_softmax(s, -1))
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


def logit_mse(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logit matching (Bucila et al., 2006; Ba & Caruana, 2014): ``mean_v (z_s - z_t)^2``,
    summed over positions.  No temperature: it is the ``tau -> inf`` limit of the KD loss.

    Args:
        student_logits: ``(..., V)`` student logits.
        teacher_logits: ``(..., V)`` teacher logits, the same shape.
        mask: boolean ``(...)`` of the positions that count (all when None).

    Returns:
        The 0-dim float32 (or float64) sum over the masked positions.

    Raises:
        ValueError: a mask whose shape is not the logits' leading shape.
    """
    s = masked_rows(student_logits, mask)
    t = masked_rows(teacher_logits, mask)
    return (s - t).pow(2).mean(-1).sum()


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Hard-label cross-entropy summed over the positions whose label is not ``ignore_index``.

    Args:
        logits: ``(..., V)`` logits.
        labels: ``(...)`` label ids.
        ignore_index: the label of positions that count in no loss.

    Returns:
        The 0-dim sum, in at least float32.
    """
    return F.cross_entropy(
        at_least_float32(logits.reshape(-1, logits.shape[-1])),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )


def token_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    taid_t: float = 1.0,
) -> torch.Tensor:
    """One of :data:`KD_LOSSES` or :data:`PLAIN_KD_LOSSES` by name, summed over the masked positions.

    Args:
        student_logits: ``(..., V)`` student logits.
        teacher_logits: ``(..., V)`` teacher logits, the same shape.
        mask: boolean ``(...)`` of the positions that count (all when None).
        loss: the loss's name.
        beta: for ``jsd``.
        skew_alpha: for ``skew_kl`` / ``skew_reverse_kl``.
        taid_t: for ``taid``.
        temperature: the softmax temperature ``tau`` (> 0).

    Returns:
        The 0-dim float32 (or float64) sum over the masked positions.

    Raises:
        ValueError: a mask whose shape is not the logits' leading shape.
        ValueError: an unknown loss name, or a parameter out of its range.
    """
    if loss == "skew_kl":
        return skew_kl(student_logits, teacher_logits, mask, skew_alpha, temperature)
    if loss == "skew_reverse_kl":
        return skew_reverse_kl(student_logits, teacher_logits, mask, skew_alpha, temperature)
    if loss == "taid":
        return taid_kl(student_logits, teacher_logits, mask, taid_t, temperature)
    if loss == "forward_kl":
        return forward_kl(student_logits, teacher_logits, mask, temperature)
    if loss == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits, mask, temperature)
    if loss == "jsd":
        return generalized_jsd(student_logits, teacher_logits, mask, beta, temperature)
    if loss == "mse":
        return logit_mse(student_logits, teacher_logits, mask)
    raise ValueError(
        f"unknown KD loss {loss!r}; choose one of {', '.join(KD_LOSSES + PLAIN_KD_LOSSES)}"
    )


def hinton_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The combined objective ``(1 - alpha) * CE(y, p_s^1) + alpha * tau^2 KL(p_t^tau || p_s^tau)``,
    each term averaged over the labelled positions (a convenience for single-batch use; the trainer
    normalises the two sums itself).

    Args:
        student_logits: ``(..., V)`` student logits.
        teacher_logits: ``(..., V)`` teacher logits, the same shape.
        labels: ``(...)`` label ids; positions labelled ``ignore_index`` count in neither term.
        alpha: the weight of the KD term.
        temperature: the KD term's temperature ``tau``.
        ignore_index: the label of positions that count in no loss.

    Returns:
        The 0-dim combined loss.
    """
    mask = mask_from_labels(labels, ignore_index)
    n = mask.sum().clamp(min=1)
    ce = cross_entropy(student_logits, labels, ignore_index)
    kd = forward_kl(student_logits, teacher_logits, mask, temperature)
    return ((1 - alpha) * ce + alpha * kd) / n
