"""The building blocks of every token-level loss: which rows count (masks), the float32 up-cast,
and row-wise KL and mixtures in log space.

The losses of :mod:`lmkd.losses.token`, :mod:`lmkd.losses.skew_taid`, :mod:`lmkd.losses.uld` and
:mod:`lmkd.losses.feature` read their inputs through these; the conventions are written in
:mod:`lmkd.losses.token`.  This module imports torch only.
"""

from __future__ import annotations

import math

import torch

from lmkd.core.constants import IGNORE_INDEX

__all__ = ["mask_from_labels", "at_least_float32", "masked_rows"]


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


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Row-wise KL(p || q) from log-probabilities, 0 where p is 0 (also against -inf).

    Args:
        log_p: ``(N, V)`` log-probabilities of ``p``.
        log_q: ``(N, V)`` log-probabilities of ``q``.

    Returns:
        ``(N,)``: the KL of each row.
    """
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * diff).sum(-1)


def log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """``log(w * a + (1 - w) * b)`` from log-probabilities, in log space (0 < w < 1): the mixture
    inside the generalized JSD and the skew KLs.

    Args:
        log_a: log-probabilities of ``a``.
        log_b: log-probabilities of ``b``, the same shape.
        w: the weight of ``a``, in (0, 1).

    Returns:
        The mixture's log-probabilities, the shape of ``log_a``.
    """
    return torch.logsumexp(torch.stack([log_a + math.log(w), log_b + math.log(1 - w)]), dim=0)
