"""Token-level distillation losses: pure functions over tensors -- forward/reverse KL with
temperature, generalized JSD, logit MSE, hard-label CE, and :func:`token_kd_loss` (any KD loss by
name, DistiLLM's skew KLs and TAID of :mod:`lmkd.losses.skew_taid` included).

Conventions shared by every token-level loss (here, in :mod:`lmkd.losses.skew_taid`, and the
building blocks of :mod:`lmkd.losses.rows`):

* ``student_logits`` / ``teacher_logits`` have shape ``(..., V)``; every leading position is one
  token (or one example for classification).
* ``mask`` is a boolean tensor of the leading shape selecting the positions that count; ``None``
  means all.  :func:`lmkd.losses.rows.mask_from_labels` builds one from labels that use ``ignore_index``.
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

import torch
import torch.nn.functional as F

from lmkd.core.constants import IGNORE_INDEX
from lmkd.losses.rows import (
    at_least_float32,
    kl_from_log_probs,
    log_mixture,
    mask_from_labels,
    masked_rows,
)
from lmkd.losses.skew_taid import skew_kl, skew_reverse_kl, taid_kl

#: names every KD path accepts (plain, chunked/fused; ``TOPK_KD_LOSSES`` of them with a top-K cache)
KD_LOSSES = ("forward_kl", "reverse_kl", "jsd", "mse")
#: names only the plain path (full logits, autograd) computes: skew KL / skew reverse KL (DistiLLM)
#: and TAID's interpolated target
PLAIN_KD_LOSSES = ("skew_kl", "skew_reverse_kl", "taid")

__all__ = [
    "IGNORE_INDEX",
    "KD_LOSSES",
    "PLAIN_KD_LOSSES",
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "logit_mse",
    "cross_entropy",
    "token_kd_loss",
    "hinton_loss",
]


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
    kl = kl_from_log_probs(F.log_softmax(t, -1), F.log_softmax(s, -1))
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
    kl = kl_from_log_probs(F.log_softmax(s, -1), F.log_softmax(t, -1))
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
    log_m = log_mixture(log_t, log_s, beta)
    jsd = beta * kl_from_log_probs(log_t, log_m) + (1 - beta) * kl_from_log_probs(log_s, log_m)
    return jsd.sum() * temperature**2


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
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Hard-label cross-entropy summed over the positions whose label is not ``ignore_index``.

    Args:
        logits: ``(..., V)`` logits.
        labels: ``(...)`` label ids.
        ignore_index: the label of positions that count in no loss.
        label_smoothing: ε: each position's loss is ``(1 - ε)·NLL + ε·mean over the V classes of
            -log p`` (torch's definition, and the HF Trainer's ``LabelSmoother``).

    Returns:
        The 0-dim sum, in at least float32.
    """
    return F.cross_entropy(
        at_least_float32(logits.reshape(-1, logits.shape[-1])),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
        label_smoothing=label_smoothing,
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
