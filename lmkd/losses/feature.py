"""Feature distillation losses: pure functions over tensors (relation losses:
:mod:`lmkd.losses.relation`).

Feature losses compare what the two models compute inside -- hidden states (FitNets, Romero et
al. 2015; DistilBERT's cosine loss, Sanh et al. 2019; Shleifer & Rush 2020's hidden-state MSE) and
attention maps (attention transfer; TinyBERT, MiniLM).

Conventions (the same as :mod:`lmkd.losses`):

* ``mask`` is a boolean ``(batch, seq)`` tensor selecting the real (non-padding) tokens; ``None``
  means all.  Padding positions never change a loss.
* Per-token losses (:func:`hidden_mse`, :func:`hidden_cosine`, :func:`hint_loss`,
  :func:`attention_loss`) are **summed** over the selected positions; the caller divides by a
  token count.
* Computation is in float32 (float64 stays float64) whatever the input dtype.

This module imports torch only; it knows nothing of models or trainers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmkd.losses.rows import at_least_float32

#: names accepted by :func:`hidden_loss` / ``DistillationConfig.hidden_loss``
HIDDEN_LOSSES = ("mse", "cosine")
#: names accepted by :func:`attention_loss` / ``DistillationConfig.attention_loss``
ATTENTION_LOSSES = ("mse", "kl")

__all__ = [
    "HIDDEN_LOSSES",
    "ATTENTION_LOSSES",
    "masked_mean_pool",
    "hidden_mse",
    "hidden_cosine",
    "hidden_loss",
    "hint_loss",
    "attention_loss",
]


def check_mask(mask: torch.Tensor | None, shape: torch.Size, what: str) -> None:
    """Refuse a mask whose shape is not ``shape``.

    Args:
        mask: a boolean mask, or None (nothing to check).
        shape: the shape it must have.
        what: what the shape is of, for the message.

    Raises:
        ValueError: the shapes differ.
    """
    if mask is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {what} {tuple(shape)}")


def _token_rows(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None):
    """The selected positions of both (shapes checked), in their own dtypes."""
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"student positions {tuple(student.shape[:-1])} and teacher positions "
            f"{tuple(teacher.shape[:-1])} differ"
        )
    check_mask(mask, student.shape[:-1], "hidden states")
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
    check_mask(mask, hidden.shape[:-1], "hidden states")
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
        check_mask(mask, (b, tq), "attention rows")
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
