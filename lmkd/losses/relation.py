"""Relation distillation losses: pure functions over tensors.

Relation losses compare how each model organises a set of representations -- Relational KD (Park
et al. 2019: distances and angles) and Similarity-Preserving KD (Tung & Mori 2019: row-normalised
Gram matrices) -- and so work across different feature sizes without any projection.

Conventions (those of :mod:`lmkd.losses.feature`): ``mask`` is a boolean ``(batch, seq)`` tensor of
the real tokens (``None``: all); :func:`rkd_loss` and :func:`sp_loss` take one set of ``N``
representations and return its loss as a *mean* over pairs/triples (normalisation given in each
docstring); :func:`relation_loss` applies them to a padded batch and returns a **sum over
examples** so that the caller, like for token losses, divides by a count (of examples): with
``pooling="mean"`` the batch's relation loss times its number of examples, with
``pooling="token"`` the sum over sequences of the relation loss among each sequence's tokens.
Computation is in float32 (float64 stays float64) whatever the input dtype.

This module imports torch only; it knows nothing of models or trainers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmkd.losses.feature import check_mask, masked_mean_pool
from lmkd.losses.rows import at_least_float32

#: names accepted by :func:`relation_loss` / ``DistillationConfig.relation_loss``
RELATION_LOSSES = ("rkd", "sp")
#: representation the relation losses are taken over
RELATION_POOLINGS = ("mean", "token")

__all__ = [
    "RELATION_LOSSES",
    "RELATION_POOLINGS",
    "rkd_distance_loss",
    "rkd_angle_loss",
    "rkd_loss",
    "sp_loss",
    "relation_loss",
]


def _pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` Euclidean distances, with a finite gradient on the (zero) diagonal."""
    diff = x.unsqueeze(1) - x.unsqueeze(0)
    sq = diff.pow(2).sum(-1)
    off = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    return torch.where(off, sq.clamp(min=1e-12).sqrt(), torch.zeros_like(sq))


def rkd_distance_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-D (Park et al. 2019, eq. 4): distances ``||x_i - x_j||`` of each side divided by their
    mean over the pairs ``i != j``, compared with the Huber loss (smooth L1, delta 1); the mean over
    the ``N (N - 1)`` ordered pairs ``i != j``.

    Args:
        student: ``(N, D_s)`` student vectors.
        teacher: ``(N, D_t)`` teacher vectors, the same ``N``.

    Returns:
        The 0-dim loss; 0 for ``N < 2``.
    """
    s, t = at_least_float32(student), at_least_float32(teacher)
    n = s.shape[0]
    if n < 2:
        return s.sum() * 0
    pairs = n * (n - 1)  # the diagonal is 0 on both sides and adds nothing below
    ds, dt = _pairwise_distances(s), _pairwise_distances(t)
    ds = ds / (ds.sum() / pairs).clamp(min=1e-12)
    dt = dt / (dt.sum() / pairs).clamp(min=1e-12)
    return F.smooth_l1_loss(ds, dt, reduction="sum", beta=1.0) / pairs


def rkd_angle_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """RKD-A (Park et al. 2019, eq. 5): for each triple the cosine of the angle at vertex ``j``,
    ``<e(x_i - x_j), e(x_k - x_j)>`` with ``e`` the unit vector, compared with the Huber loss;
    the mean over the ``N (N - 1)^2`` triples with ``i != j`` and ``k != j``.  Memory grows as
    ``N^2 D`` (and ``N^3`` for the cosines).

    Args:
        student: ``(N, D_s)`` student vectors.
        teacher: ``(N, D_t)`` teacher vectors, the same ``N``.

    Returns:
        The 0-dim loss; 0 for ``N < 2``.
    """
    s, t = at_least_float32(student), at_least_float32(teacher)
    n = s.shape[0]
    if n < 2:
        return s.sum() * 0

    def cosines(x):
        e = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=-1)  # e[j, i] = unit(x_i - x_j)
        return torch.bmm(e, e.transpose(1, 2))  # [j, i, k]

    # e[j, j] = 0, so the cosines with i == j or k == j are 0 on both sides and add nothing below
    return F.smooth_l1_loss(cosines(s), cosines(t), reduction="sum", beta=1.0) / (n * (n - 1) ** 2)


def rkd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    distance_weight: float = 1.0,
    angle_weight: float = 2.0,
) -> torch.Tensor:
    """Relational KD: ``distance_weight * RKD-D + angle_weight * RKD-A``; the default 1:2 ratio is
    Park et al.'s (their RKD-DA).  Invariant to rotations, translations and scaling of either
    side and to its feature dimension.

    Args:
        student: ``(N, D_s)`` student vectors.
        teacher: ``(N, D_t)`` teacher vectors, the same ``N``.
        distance_weight: the weight of :func:`rkd_distance_loss`.
        angle_weight: the weight of :func:`rkd_angle_loss`.

    Returns:
        The 0-dim loss.
    """
    loss = student.new_zeros((), dtype=torch.float32)
    if distance_weight:
        loss = loss + distance_weight * rkd_distance_loss(student, teacher)
    if angle_weight:
        loss = loss + angle_weight * rkd_angle_loss(student, teacher)
    return loss


def sp_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Similarity-Preserving KD (Tung & Mori 2019, eq. 3-4): Gram matrices ``G = X X^T``
    ``(N, N)`` of each side, each row L2-normalised, and ``||G_s - G_t||_F^2 / N^2``.  Invariant
    to rotations and scaling of either side and to its feature dimension.

    Args:
        student: ``(N, D_s)`` student vectors.
        teacher: ``(N, D_t)`` teacher vectors, the same ``N``.

    Returns:
        The 0-dim loss.
    """
    s, t = at_least_float32(student), at_least_float32(teacher)
    n = s.shape[0]
    if n == 0:
        return s.sum() * 0
    gs = F.normalize(s @ s.T, p=2, dim=1)
    gt = F.normalize(t @ t.T, p=2, dim=1)
    return (gs - gt).pow(2).sum() / (n * n)


def _sp_per_sequence(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """:func:`sp_loss` among the selected tokens of each sequence, for all sequences at once
    ``(B,)``: padded tokens give zero rows and columns of the Gram matrices, which add nothing."""
    s, t = at_least_float32(student), at_least_float32(teacher)
    if mask is None:
        mask = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)
    m = mask.to(s.dtype)
    s, t = s * m.unsqueeze(-1), t * m.unsqueeze(-1)
    gs = F.normalize(s @ s.transpose(1, 2), p=2, dim=-1)
    gt = F.normalize(t @ t.transpose(1, 2), p=2, dim=-1)
    n = m.sum(1)
    return (gs - gt).pow(2).sum((1, 2)) / (n * n).clamp(min=1)


def relation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    loss: str = "rkd",
    pooling: str = "mean",
) -> torch.Tensor:
    """Relational loss (``"rkd"`` or ``"sp"``) between hidden states, **summed over examples**.

    ``pooling="mean"``: each sequence is the masked mean of its tokens, the relations are among
    the ``B`` pooled vectors, and the returned value is that batch loss times ``B``.
    ``pooling="token"``: the relations are among the selected tokens of each sequence (so the
    loss is defined for a batch of one) and the returned value is the sum over sequences.
    Dividing by the number of examples gives a mean per example in both cases.

    Args:
        student: ``(B, T, D_s)`` student hidden states.
        teacher: ``(B, T, D_t)`` teacher hidden states.
        mask: ``(B, T)`` of the selected tokens (all when None).
        loss: one of :data:`RELATION_LOSSES`.
        pooling: one of :data:`RELATION_POOLINGS`.

    Returns:
        The 0-dim sum over examples.

    Raises:
        ValueError: an unknown loss or pooling; the two sides' positions differ.
    """
    if loss not in RELATION_LOSSES:
        raise ValueError(
            f"unknown relation loss {loss!r}; choose one of {', '.join(RELATION_LOSSES)}"
        )
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"student positions {tuple(student.shape[:-1])} and teacher positions "
            f"{tuple(teacher.shape[:-1])} differ"
        )
    fn = rkd_loss if loss == "rkd" else sp_loss
    if pooling == "mean":
        return (
            fn(masked_mean_pool(student, mask), masked_mean_pool(teacher, mask)) * student.shape[0]
        )
    if pooling == "token":
        check_mask(mask, student.shape[:-1], "hidden states")
        if loss == "sp":
            return _sp_per_sequence(student, teacher, mask).sum()
        total = student.new_zeros((), dtype=torch.float32)
        for i in range(student.shape[0]):
            s, t = student[i], teacher[i]
            if mask is not None:
                m = mask[i].to(torch.bool)
                s, t = s[m], t[m]
            total = total + fn(s, t)
        return total
    raise ValueError(
        f"unknown relation pooling {pooling!r}; choose one of {', '.join(RELATION_POOLINGS)}"
    )
