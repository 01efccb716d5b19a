"""Cross-tokenizer KD losses: ULD and its hybrid with the exact KL over shared tokens.

* :func:`uld_loss` -- the Universal Logit Distillation loss (Boizard et al., 2024, "Towards
  Cross-Tokenizer Distillation: the Universal Logit Distillation Loss"): per position, the L1
  distance between the two models' probability vectors each sorted in decreasing order, the
  shorter zero-padded to the larger vocabulary -- the closed form of the Wasserstein-1 distance
  between the two distributions under a cost that is 1 between any two distinct tokens, once the
  token identities are dropped.  It needs no shared vocabulary, only aligned positions
  (:mod:`lmkd.teacher.cross_tokenizer`).
* :func:`uld_hybrid_loss` -- where the vocabularies share token strings, the exact forward KL
  terms ``p_t(k) log(p_t(k) / p_s(k))`` over the shared tokens (probabilities of the full softmaxes,
  not renormalised), plus ULD between the probabilities of the remaining tokens of each side (as
  TRL's GOLD hybrid).  With one tokenizer every token is shared, the ULD part is empty and the loss
  is exactly :func:`lmkd.losses.forward_kl`.

Against the references (tests/test_uld.py): per position, :func:`uld_loss` is the distillation term
of Boizard et al.'s ``DistillationLoss`` (Nicolas-BZRD/llm-recipes, models/distillation_model.py),
which averages over positions and rows where lmkd sums.  :func:`uld_hybrid_loss` is GOLD's
``ULDLoss._compute_hybrid_uld_loss`` (huggingface/trl, trl/experimental/gold/gold_trainer.py) with
``beta=0`` and both weights 1.  GOLD's defaults differ, on purpose here: ``beta=0.5`` makes the
matched part a JSD, not the exact KL this loss is for, and its adaptive weights (matched share of
the teacher's token *types*, and one minus it) are no measure of the probability mass each part
carries -- with one tokenizer they are (1, 0), where both are the forward KL.

Conventions as :mod:`lmkd.losses.token`: summed over the masked positions, float32 softmaxes.
Temperature softens both softmaxes; the KL part is scaled by ``tau^2`` (as forward_kl), the ULD part
is not (an L1 distance between probability vectors, bounded by 2, with no ``1/tau^2`` gradient shrink
to undo; the paper uses no temperature).  Student and teacher logits have the same leading shape
(the aligned positions) and may have different last dimensions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmkd.losses.rows import masked_rows

#: the kd_loss names that take a teacher with another tokenizer (``teacher_tokenizer``)
CROSS_KD_LOSSES = ("uld", "uld_hybrid")

__all__ = ["CROSS_KD_LOSSES", "sorted_l1", "uld_loss", "uld_hybrid_loss", "cross_kd_loss"]


def sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row-wise ``sum_i |sort(p)_i - sort(q)_i|`` (both sorted decreasing, the shorter zero-padded).

    Args:
        p: ``(n, V_p)`` probabilities.
        q: ``(n, V_q)`` probabilities.

    Returns:
        ``(n,)`` distances.
    """
    v = max(p.shape[-1], q.shape[-1])
    p = F.pad(p.sort(-1, descending=True).values, (0, v - p.shape[-1]))
    q = F.pad(q.sort(-1, descending=True).values, (0, v - q.shape[-1]))
    return (p - q).abs().sum(-1)


def uld_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """ULD: the sorted-probability L1 distance per position, summed over the masked positions.

    Args:
        student_logits: ``(..., V_s)`` student logits (its own vocabulary).
        teacher_logits: ``(..., V_t)`` teacher logits, the same positions (the teacher's vocabulary).
        mask: boolean ``(...)`` of the positions that count (all when None).
        temperature: the softmax temperature.

    Returns:
        The 0-dim sum.
    """
    s = F.softmax(masked_rows(student_logits, mask) / temperature, -1)
    t = F.softmax(masked_rows(teacher_logits, mask) / temperature, -1)
    return sorted_l1(s, t).sum()


def uld_hybrid_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_shared: torch.Tensor,
    teacher_shared: torch.Tensor,
    mask: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``tau^2 * sum_{k shared} p_t(k) log(p_t(k) / p_s(k))`` + ULD of the unshared probabilities,
    summed over the masked positions.

    Args:
        student_logits: ``(..., V_s)`` student logits (its own vocabulary).
        teacher_logits: ``(..., V_t)`` teacher logits, the same positions (the teacher's vocabulary).
        student_shared: ids in the student's vocabulary; ``student_shared[i]`` and
            ``teacher_shared[i]`` are the ids of the same token string in each vocabulary
            (:func:`lmkd.teacher.cross_tokenizer.shared_vocabulary`).
        teacher_shared: the same tokens' ids in the teacher's vocabulary.
        mask: boolean ``(...)`` of the positions that count (all when None).
        temperature: the softmax temperature ``tau``.

    Returns:
        The 0-dim sum.

    Raises:
        ValueError: the two id lists do not pair one to one (different shapes).
    """
    if student_shared.shape != teacher_shared.shape:
        raise ValueError("student_shared and teacher_shared must pair ids one to one")
    log_s = F.log_softmax(masked_rows(student_logits, mask) / temperature, -1)
    log_t = F.log_softmax(masked_rows(teacher_logits, mask) / temperature, -1)
    s_idx, t_idx = student_shared.to(log_s.device), teacher_shared.to(log_t.device)
    ls, lt = log_s[:, s_idx], log_t[:, t_idx]
    pt = lt.exp()
    kl = (pt * torch.where(pt > 0, lt - ls, torch.zeros_like(lt))).sum(-1)
    keep_s = torch.ones(log_s.shape[-1], dtype=torch.bool, device=log_s.device)
    keep_t = torch.ones(log_t.shape[-1], dtype=torch.bool, device=log_t.device)
    keep_s[s_idx], keep_t[t_idx] = False, False
    rest = sorted_l1(log_s[:, keep_s].exp(), log_t[:, keep_t].exp())
    return kl.sum() * temperature**2 + rest.sum()


def cross_kd_loss(
    student_logits,
    teacher_logits,
    mask=None,
    *,
    loss: str = "uld",
    temperature: float = 1.0,
    shared: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """One of :data:`CROSS_KD_LOSSES` by name.

    Args:
        student_logits: ``(..., V_s)`` student logits (its own vocabulary).
        teacher_logits: ``(..., V_t)`` teacher logits, the same positions (the teacher's vocabulary).
        mask: boolean ``(...)`` of the positions that count (all when None).
        loss: ``uld`` or ``uld_hybrid``.
        temperature: the softmax temperature.
        shared: the ``(student ids, teacher ids)`` pairs ``uld_hybrid`` needs.

    Returns:
        The 0-dim sum.

    Raises:
        ValueError: an unknown loss, or ``uld_hybrid`` without ``shared``.
    """
    if loss == "uld":
        return uld_loss(student_logits, teacher_logits, mask, temperature)
    if loss == "uld_hybrid":
        if shared is None:
            raise ValueError(
                "uld_hybrid needs the shared token ids (lmkd.teacher.cross_tokenizer.shared_vocabulary)"
            )
        return uld_hybrid_loss(
            student_logits, teacher_logits, shared[0], shared[1], mask, temperature
        )
    raise ValueError(
        f"unknown cross-tokenizer KD loss {loss!r}; choose one of {', '.join(CROSS_KD_LOSSES)}"
    )
