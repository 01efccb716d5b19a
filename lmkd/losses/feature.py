"""Feature and relation distillation losses: pure functions over tensors.

Feature losses compare what the two models compute inside -- hidden states (FitNets, Romero et
al. 2015; DistilBERT's cosine loss, Sanh et al. 2019; Shleifer & Rush 2020's hidden-state MSE) and
attention maps (attention transfer; TinyBERT, MiniLM).  Relation losses compare how each model
organises a set of representations -- Relational KD (Park et al. 2019: distances and angles) and
Similarity-Preserving KD (Tung & Mori 2019: row-normalised Gram matrices) -- and so work across
different feature sizes without any projection.

Conventions (the same as :mod:`lmkd.losses`):

* ``mask`` is a boolean ``(batch, seq)`` tensor selecting the real (non-padding) tokens; ``None``
  means all.  Padding positions never change a loss.
* Per-token losses (:func:`hidden_mse`, :func:`hidden_cosine`, :func:`hint_loss`,
  :func:`attention_loss`) are **summed** over the selected positions; the caller divides by a
  token count.
* Relation losses are batch-level.  :func:`rkd_loss` and :func:`sp_loss` take one set of ``N``
  representations and return its loss as a *mean* over pairs/triples (normalisation given in each
  docstring).  :func:`relation_loss` applies them to a padded batch and returns a **sum over
  examples** so that the caller, like for token losses, divides by a count (of examples): with
  ``pooling="mean"`` the batch's relation loss times its number of examples, with
  ``pooling="token"`` the sum over sequences of the relation loss among each sequence's tokens.
* Computation is in float32 (float64 stays float64) whatever the input dtype.

This module imports torch only; it knows nothing of models or trainers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmkd.losses.token import at_least_float32

#: names accepted by :func:`hidden_loss` / ``DistillationConfig.hidden_loss``
HIDDEN_LOSSES = ("mse", "cosine")
#: names accepted by :func:`attention_loss` / ``DistillationConfig.attention_loss``
ATTENTION_LOSSES = ("mse", "kl")
#: names accepted by :func:`relation_loss` / ``DistillationConfig.relation_loss``
RELATION_LOSSES = ("rkd", "sp")
#: representation the relation losses are taken over
RELATION_POOLINGS = ("mean", "token")

__all__ = [
    "HIDDEN_LOSSES",
    "ATTENTION_LOSSES",
    "RELATION_LOSSES",
    "RELATION_POOLINGS",
    "masked_mean_pool",
    "hidden_mse",
    "hidden_cosine",
    "hidden_loss",
    "hint_loss",
    "attention_loss",
    "rkd_distance_loss",
    "rkd_angle_loss",
    "rkd_loss",
    "sp_loss",
    "relation_loss",
]


def _check_mask(mask: torch.Tensor | None, shape: torch.Size, what: str) -> None:
    if mask is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {what} {tuple(shape)}")


def _token_rows(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None):
    """The selected positions of both (shapes checked), in their own dtypes."""
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"student positions {tuple(student.shape[:-1])} and teacher positions "
            f"{tuple(teacher.shape[:-1])} differ"
        )
    _check_mask(mask, student.shape[:-1], "hidden states")
    if mask is not None:
        m = mask.to(torch.bool)
        student, teacher = student[m], teacher[m]
    return student, teacher


def _token_select(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None):
    """``(N, D_s)``, ``(N, D_t)`` rows of the selected positions, in float32."""
    student, teacher = _token_rows(student, teacher, mask)
    return (
        at_least_float32(student.reshape(-1, student.shape[-1])),
        at_least_float32(teacher.reshape(-1, teacher.shape[-1])),
    )


# ---- hidden states ----------------------------------------------------------------------------


def masked_mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, T, D) -> (B, D)``: the mean over each sequence's selected tokens (0 for an empty one).

    Args:
        hidden: ``(B, T, D)`` hidden states.
        mask: ``(B, T)`` of the selected tokens (all when None).

    Returns:
        ``(B, D)``, in ``hidden``'s dtype.

    Raises:
        ValueError: the mask's shape is not ``(B, T)``.
    """
    hidden = at_least_float32(hidden)
    if mask is None:
        return hidden.mean(1)
    _check_mask(mask, hidden.shape[:-1], "hidden states")
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def hidden_mse(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``mean_d (h_s - h_t)^2`` per token, summed over the selected tokens (Shleifer & Rush 2020).
    Both hidden sizes must be equal (see :func:`hint_loss` otherwise).

    Args:
        student: ``(..., D)`` student hidden states.
        teacher: ``(..., D)`` teacher hidden states, the same positions.
        mask: ``(...)`` of the selected tokens (all when None).

    Returns:
        The 0-dim sum over the selected tokens, in at least float32.

    Raises:
        ValueError: the two sides' positions differ, or the mask's shape is not theirs; the hidden sizes
            differ.
    """
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"hidden sizes differ ({student.shape[-1]} vs {teacher.shape[-1]}); project the "
            "student first (hint_loss)"
        )
    s, t = _token_select(student, teacher, mask)
    return (s - t).pow(2).mean(-1).sum()


def hidden_cosine(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """DistilBERT's ``alpha_cos`` term: ``1 - cos(h_s, h_t)`` per token, summed over the selected
    tokens.  Unchanged when either side is scaled by a positive factor.

    Args:
        student: ``(..., D)`` student hidden states.
        teacher: ``(..., D)`` teacher hidden states, the same positions.
        mask: ``(...)`` of the selected tokens (all when None).
        eps: the smallest norm in the cosine's denominator.

    Returns:
        The 0-dim sum over the selected tokens, in at least float32.

    Raises:
        ValueError: the two sides' positions differ, or the mask's shape is not theirs; the hidden sizes
            differ.
    """
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(
            f"hidden sizes differ ({student.shape[-1]} vs {teacher.shape[-1]}); project the "
            "student first (hint_loss)"
        )
    s, t = _token_select(student, teacher, mask)
    return (1 - F.cosine_similarity(s, t, dim=-1, eps=eps)).sum()


def hidden_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    loss: str = "mse",
) -> torch.Tensor:
    """One of :data:`HIDDEN_LOSSES` by name, summed over the selected tokens.

    Args:
        student: ``(..., D)`` student hidden states.
        teacher: ``(..., D)`` teacher hidden states, the same positions.
        mask: ``(...)`` of the selected tokens (all when None).
        loss: ``mse`` (:func:`hidden_mse`) or ``cosine`` (:func:`hidden_cosine`).

    Returns:
        The 0-dim sum over the selected tokens, in at least float32.

    Raises:
        ValueError: the two sides' positions differ, or the mask's shape is not theirs; the hidden sizes
            differ; an unknown loss.
    """
    if loss == "mse":
        return hidden_mse(student, teacher, mask)
    if loss == "cosine":
        return hidden_cosine(student, teacher, mask)
    raise ValueError(f"unknown hidden loss {loss!r}; choose one of {', '.join(HIDDEN_LOSSES)}")


def hint_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    projection: torch.nn.Module | None,
    mask: torch.Tensor | None = None,
    *,
    loss: str = "mse",
) -> torch.Tensor:
    """FitNets' hint loss: the student's hidden states mapped to the teacher's size by a learned
    ``projection`` and compared with :func:`hidden_loss`.  Only the selected tokens go through the
    projection, cast to its dtype.

    Args:
        student: ``(..., D_s)`` student hidden states.
        teacher: ``(..., D_t)`` teacher hidden states.
        projection: the regressor, e.g. ``nn.Linear(d_s, d_t)``; None compares them directly (equal sizes).
        mask: ``(...)`` of the selected tokens (all when None).
        loss: one of :data:`HIDDEN_LOSSES`.

    Returns:
        The 0-dim sum over the selected tokens, in at least float32.

    Raises:
        ValueError: the two sides' positions differ, or the mask's shape is not theirs; the sizes differ after
            the projection; an unknown loss.
    """
    student, teacher = _token_rows(student, teacher, mask)
    if projection is not None:
        weight = next(projection.parameters(), None)
        if weight is not None and weight.is_floating_point():
            student = student.to(weight.dtype)  # e.g. bf16 hidden states into a float32 projection
        student = projection(student)
    return hidden_loss(student, teacher, None, loss=loss)


# ---- attention maps ---------------------------------------------------------------------------


def attention_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    loss: str = "kl",
    eps: float = 1e-12,
) -> torch.Tensor:
    """Distance between self-attention distributions ``(B, H, T, T)`` (rows: queries, columns:
    keys; each row sums to 1), summed over the selected query positions.

    Per query position the loss is the mean over heads of ``KL(a_t || a_s)`` over the keys
    (``loss="kl"``, MiniLM) or of the squared error summed over the keys (``loss="mse"``,
    TinyBERT on probabilities).  ``mask`` ``(B, T)`` selects both the query rows and the key
    columns, so padded keys never count.  When the head counts differ both maps are first
    averaged over their heads.

    Hugging Face models return attention weights *after* attention dropout, so in training some
    student weights are exactly 0 (and the rest scaled up).  Keys whose student weight is exactly 0
    are therefore left out and both rows renormalised over the remaining keys: the loss compares
    the two distributions restricted to the keys the student kept (without dropout this is the
    plain loss, since softmax weights are positive).

    Args:
        student: ``(B, H_s, T, T)`` student attention weights.
        teacher: ``(B, H_t, T, T)`` teacher attention weights.
        mask: ``(B, T)`` of the selected positions (all when None).
        loss: one of :data:`ATTENTION_LOSSES`.
        eps: the floor of the probabilities inside the logarithms.

    Returns:
        The 0-dim sum over the selected query positions, in at least float32.

    Raises:
        ValueError: maps not 4-dimensional, or that do not align; an unknown loss; a mask for maps whose
            queries are not their keys.
    """
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError("attention maps must have shape (batch, heads, queries, keys)")
    if student.shape[0] != teacher.shape[0] or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(
            f"attention maps {tuple(student.shape)} and {tuple(teacher.shape)} do not align"
        )
    if loss not in ATTENTION_LOSSES:
        raise ValueError(
            f"unknown attention loss {loss!r}; choose one of {', '.join(ATTENTION_LOSSES)}"
        )
    s, t = at_least_float32(student), at_least_float32(teacher)
    if s.shape[1] != t.shape[1]:
        s, t = s.mean(1, keepdim=True), t.mean(1, keepdim=True)
    b, _, tq, tk = s.shape
    kept = s > 0
    if mask is not None:
        if tq != tk:
            raise ValueError("a mask can only be given for self-attention maps (queries = keys)")
        _check_mask(mask, (b, tq), "attention rows")
        kept = kept & mask.to(torch.bool)[:, None, None, :]
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    s, t = torch.where(kept, s, zero), torch.where(kept, t, zero)
    s = s / s.sum(-1, keepdim=True).clamp(min=eps)
    t = t / t.sum(-1, keepdim=True).clamp(min=eps)
    if loss == "kl":
        # clamp before the log: log(0) would give a NaN gradient even where torch.where drops it
        per = torch.where(
            t > 0, t * (torch.log(t.clamp(min=eps)) - torch.log(s.clamp(min=eps))), zero
        )
    else:
        per = torch.where(kept, (s - t).pow(2), zero)
    per_query = per.sum(-1).mean(1)  # (B, T): summed over keys, averaged over heads
    if mask is not None:
        per_query = per_query[mask.to(torch.bool)]
    return per_query.sum()


# ---- relations --------------------------------------------------------------------------------


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
        _check_mask(mask, student.shape[:-1], "hidden states")
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
