"""Distillation losses: pure functions over tensors.

Conventions shared by every function here:

* ``student_logits`` / ``teacher_logits`` have shape ``(..., V)``; every leading position is one
  token (or one example for classification).
* ``mask`` is a boolean tensor of the leading shape selecting the positions that count; ``None``
  means all.  :func:`mask_from_labels` builds one from labels that use ``ignore_index``.
* Every loss is **summed** over the selected positions (reduction ``"sum"``).  Callers divide by
  a token count -- the trainer divides by the number of positions in the whole (accumulated,
  all-process) batch, so gradient accumulation gives the gradient of one big batch.
* Softmaxes are taken in float32 whatever the input dtype, so fp16/bf16 logits and logits of
  +-1e4 stay finite; a batch where every position is masked gives exactly 0 with a 0 gradient.

This module imports torch only; it knows nothing of models or trainers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX

#: names accepted by :func:`token_kd_loss` (and ``DistillationConfig.kd_loss``)
KD_LOSSES = ("forward_kl", "reverse_kl", "jsd", "mse")

__all__ = ["IGNORE_INDEX", "KD_LOSSES", "mask_from_labels", "forward_kl", "reverse_kl", "generalized_jsd",
           "logit_mse", "cross_entropy", "token_kd_loss", "hinton_loss", "at_least_float32"]


def mask_from_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Boolean mask of the positions whose label is not ``ignore_index``."""
    return labels.ne(ignore_index)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` up-cast to float32 when it is half precision (bf16/fp16); float32 and float64 stay as
    they are.  Every loss of :mod:`lmkd.losses` computes in this dtype."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _select(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Flatten to ``(N, V)`` keeping only the masked positions, in at least float32."""
    v = logits.shape[-1]
    if mask is not None:
        if mask.shape != logits.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits {tuple(logits.shape[:-1])}")
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
    """
    s = _select(student_logits, mask) / temperature
    t = _select(teacher_logits, mask) / temperature
    kl = _kl_from_log_probs(F.log_softmax(t, -1), F.log_softmax(s, -1))
    return kl.sum() * temperature**2


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Mode-seeking ``tau^2 * KL(p_s^tau || p_t^tau)``, summed over positions (MiniLLM, GKD)."""
    s = _select(student_logits, mask) / temperature
    t = _select(teacher_logits, mask) / temperature
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
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, mask, temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, mask, temperature)
    log_s = F.log_softmax(_select(student_logits, mask) / temperature, -1)
    log_t = F.log_softmax(_select(teacher_logits, mask) / temperature, -1)
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1 - beta)]), dim=0)
    jsd = beta * _kl_from_log_probs(log_t, log_m) + (1 - beta) * _kl_from_log_probs(log_s, log_m)
    return jsd.sum() * temperature**2


def logit_mse(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logit matching (Bucila et al., 2006; Ba & Caruana, 2014): ``mean_v (z_s - z_t)^2``,
    summed over positions.  No temperature: it is the ``tau -> inf`` limit of the KD loss."""
    s = _select(student_logits, mask)
    t = _select(teacher_logits, mask)
    return (s - t).pow(2).mean(-1).sum()


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Hard-label cross-entropy summed over the positions whose label is not ``ignore_index``."""
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
) -> torch.Tensor:
    """One of :data:`KD_LOSSES` by name, summed over the masked positions."""
    if loss == "forward_kl":
        return forward_kl(student_logits, teacher_logits, mask, temperature)
    if loss == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits, mask, temperature)
    if loss == "jsd":
        return generalized_jsd(student_logits, teacher_logits, mask, beta, temperature)
    if loss == "mse":
        return logit_mse(student_logits, teacher_logits, mask)
    raise ValueError(f"unknown KD loss {loss!r}; choose one of {', '.join(KD_LOSSES)}")


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
    normalises the two sums itself)."""
    mask = mask_from_labels(labels, ignore_index)
    n = mask.sum().clamp(min=1)
    ce = cross_entropy(student_logits, labels, ignore_index)
    kd = forward_kl(student_logits, teacher_logits, mask, temperature)
    return ((1 - alpha) * ce + alpha * kd) / n
