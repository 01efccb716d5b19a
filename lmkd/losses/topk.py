"""Top-K teachers: the divergence between a cached top-K teacher and the student, over K + 1 buckets.

A cached teacher (``lmkd.teacher.logit_cache``) keeps, per position, its K most likely token ids, their
log-probabilities and the log of the remaining mass (:class:`TopK`), optionally with M tokens
drawn from the mass outside the top-K.  The KL is then taken between the two distributions over
K + 1 buckets -- the K cached ids, and one tail bucket holding all other tokens -- or, for the
forward KL with samples, against the top-K plus the sampled tail (an unbiased estimate).

:func:`topk_kd_loss` is the plain autograd reference; :func:`topk_kd_chunk` is the closed form
(value and gradient w.r.t. the student's logits) that :mod:`lmkd.losses.chunked` runs per chunk;
:func:`bucket_divergence` is the divergence over buckets both use (a full vocabulary is the case
of one token per bucket).  Conventions are those of :mod:`lmkd.losses.token`.

This module imports torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmkd.losses.token import KD_LOSSES

#: the divergences a top-K teacher supports (the others need the teacher's full logits)
TOPK_KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")


@dataclass
class TopK:
    """A top-K teacher for a set of positions.

    Args:
        ids: token ids ``(N, K)``.
        logprobs: their log-probabilities ``(N, K)``.
        tail: the log of the remaining mass ``(N,)`` (``-inf`` when the top-K holds it all).
        sample_ids: optionally ``M`` token ids per position drawn (with replacement) from the
            teacher's distribution outside the top-K, ``(N, M)``.
        sample_logprobs: their log-probabilities ``(N, M)``.
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail: torch.Tensor
    sample_ids: torch.Tensor | None = None
    sample_logprobs: torch.Tensor | None = None

    def map(self, fn) -> TopK:
        """A TopK of ``fn(t)`` for each of its tensors (absent samples stay None).

        Args:
            fn: a function of a tensor.

        Returns:
            The new :class:`TopK`.
        """
        return TopK(
            *(
                None if t is None else fn(t)
                for t in (self.ids, self.logprobs, self.tail, self.sample_ids, self.sample_logprobs)
            )
        )

    def rows(self, index: torch.Tensor) -> TopK:
        """The teacher at some positions.

        Args:
            index: the rows to take (an index tensor, a boolean mask or a slice).

        Returns:
            A :class:`TopK` of those rows.
        """
        return self.map(lambda t: t[index])

    @property
    def sampled(self) -> bool:
        """Whether the cache holds sampled tail tokens (at least one per position)."""
        return self.sample_ids is not None and self.sample_ids.shape[-1] > 0


def bucket_divergence(lt: torch.Tensor, ls: torch.Tensor, loss: str, beta: float):
    """Per-row divergence between teacher and student log-probs over the same buckets.

    Args:
        lt: the teacher's log-probs ``(n, B)``.
        ls: the student's log-probs ``(n, B)``.
        loss: the divergence (one of :data:`lmkd.losses.token.KD_LOSSES` but ``mse``).
        beta: the ``jsd`` mixture weight.

    Returns:
        ``(rows, h)``: the divergence per row ``(n,)``, and ``h = P_s * dL/dP_s`` (the gradient w.r.t.
        the student's probabilities times those probabilities: finite wherever the loss is).

    Raises:
        ValueError: an unknown loss.
    """
    zero = torch.zeros((), dtype=ls.dtype, device=ls.device)
    if loss == "jsd" and beta == 0.0:
        loss = "forward_kl"
    if loss == "jsd" and beta == 1.0:
        loss = "reverse_kl"
    if loss == "forward_kl":
        pt = lt.exp()
        rows = torch.where(pt > 0, pt * (lt - ls), zero).sum(-1)
        return rows, -pt
    ps = ls.exp()
    if loss == "reverse_kl":
        d = torch.where(ps > 0, ls - lt, zero)
        return (ps * d).sum(-1), ps * d
    if loss == "jsd":
        pt = lt.exp()
        lm = torch.logaddexp(lt + math.log(beta), ls + math.log(1 - beta))
        ds = torch.where(ps > 0, ls - lm, zero)
        rows = beta * torch.where(pt > 0, pt * (lt - lm), zero).sum(-1) + (1 - beta) * (
            ps * ds
        ).sum(-1)
        return rows, (1 - beta) * ps * ds
    raise ValueError(f"unknown KD loss {loss!r}; choose one of {', '.join(KD_LOSSES)}")


def _topk_buckets(ls: torch.Tensor, teacher: TopK, temperature: float):
    """Teacher and student log-probs over the K + 1 buckets (top-K ids, tail) of one chunk, given
    the student's tempered log-softmax ``ls`` ``(n, V)``; also the student's log tail mass."""
    ids = teacher.ids.long()
    s_top = ls.gather(1, ids)
    s_tail = torch.logsumexp(ls.scatter(1, ids, float("-inf")), -1)
    t = torch.cat([teacher.logprobs.float(), teacher.tail.float().unsqueeze(-1)], -1)
    lt = F.log_softmax(t / temperature, -1)
    return lt, torch.cat([s_top, s_tail.unsqueeze(-1)], -1), s_tail


def _uses_samples(teacher: TopK, loss: str, beta: float) -> bool:
    """Sampled tails serve the forward KL (for which they give an unbiased gradient); the other
    divergences need the teacher's probability wherever the student puts mass: the tail bucket."""
    return teacher.sampled and (loss == "forward_kl" or (loss == "jsd" and beta == 0.0))


def _sampled_targets(teacher: TopK, temperature: float):
    """The tempered teacher over the K top ids and the M tail samples of each position.

    Returns ``(ids (n, K+M), weights (n, K+M), log-probs (n, K+M))``: ``weights`` is the target
    distribution (summing to 1 per row; a token drawn twice has two entries), ``log-probs`` the
    tempered teacher log-probability of each entry.  At ``tau = 1`` each sample stands for
    ``P_tail / M`` of the mass, so the weights, scattered over the vocabulary, are an unbiased
    estimate of the teacher's distribution.  At other ``tau`` the tempered tail mass
    ``sum_tail p_j^(1/tau)`` is estimated by importance sampling, ``P_tail / M * sum_m
    p_m^(1/tau - 1)``, and everything is normalised together (self-normalised: consistent)."""
    inv = 1.0 / temperature
    lt_top = teacher.logprobs.float()
    lt_smp = teacher.sample_logprobs.float()
    m = lt_smp.shape[-1]
    tail = teacher.tail.float().unsqueeze(-1)
    # log of each entry's unnormalised tempered mass
    log_top = lt_top * inv
    log_smp = (tail - math.log(m)).expand_as(lt_smp)
    if inv != 1.0:
        log_smp = log_smp + lt_smp * (inv - 1.0)
    log_smp = torch.where(torch.isfinite(tail), log_smp, torch.full_like(log_smp, float("-inf")))
    log_mass = torch.cat([log_top, log_smp], -1)
    log_z = torch.logsumexp(log_mass, -1, keepdim=True)
    weights = (log_mass - log_z).exp()
    logprobs = torch.cat([lt_top, lt_smp], -1) * inv - log_z
    return torch.cat([teacher.ids, teacher.sample_ids], -1).long(), weights, logprobs


def _sampled_rows(ls: torch.Tensor, teacher: TopK, temperature: float):
    """Per-row forward KL against the top-K + sampled-tail teacher, given the student's tempered
    log-softmax ``ls``; also the entries' ids and target weights (for the gradient)."""
    ids, w, lq = _sampled_targets(teacher, temperature)
    rows = torch.where(w > 0, w * (lq - ls.gather(1, ids)), torch.zeros_like(w)).sum(-1)
    return rows, ids, w


def _kd_sampled(s: torch.Tensor, teacher: TopK, temperature: float):
    """Forward KL against the top-K + sampled-tail teacher: (sum, gradient w.r.t. ``s``)."""
    ls = F.log_softmax(s / temperature if temperature != 1.0 else s, -1)
    rows, ids, w = _sampled_rows(ls, teacher, temperature)
    grad = ls.exp_()
    grad.scatter_add_(1, ids, -w)
    return rows.sum() * temperature**2, grad.mul_(temperature)


def topk_kd_chunk(s: torch.Tensor, teacher: TopK, loss: str, temperature: float, beta: float):
    """The closed form the chunked losses use against a top-K teacher with one tail bucket (or, for the
    forward KL, with the teacher's sampled tail when the cache holds one).

    Args:
        s: float32 student logits ``(n, V)``.
        teacher: the top-K teacher of those rows.
        loss: the divergence (one of :data:`TOPK_KD_LOSSES`).
        temperature: its temperature.
        beta: the ``jsd`` mixture weight.

    Returns:
        ``(sum of the divergence, gradient w.r.t. s)``.

    Raises:
        ValueError: a loss a top-K cache does not support (not in :data:`TOPK_KD_LOSSES`).
    """
    if loss not in TOPK_KD_LOSSES:
        raise ValueError(
            f"KD loss {loss!r} needs the teacher's full logits; a top-K cache supports "
            f"{', '.join(TOPK_KD_LOSSES)}"
        )
    if _uses_samples(teacher, loss, beta):
        return _kd_sampled(s, teacher, temperature)
    ls = F.log_softmax(s / temperature if temperature != 1.0 else s, -1)
    ids = teacher.ids.long()
    p = ls.exp()
    # The student's tail mass as a plain sum of its non-top-K probabilities (no cancellation);
    # rows where it is too small for float32 (< 1e-30) take the exact log-sum-exp instead.
    p_tail = p.scatter(1, ids, 0.0).sum(-1)
    tiny = p_tail < 1e-30
    s_tail = p_tail.log()
    any_tiny = bool(tiny.any())
    if any_tiny:
        s_tail[tiny] = torch.logsumexp(ls[tiny].scatter(1, ids[tiny], float("-inf")), -1)
    t = torch.cat([teacher.logprobs.float(), teacher.tail.float().unsqueeze(-1)], -1)
    lt = F.log_softmax(t / temperature, -1)
    p_top = p.gather(1, ids)
    lsb = torch.cat([ls.gather(1, ids), s_tail.unsqueeze(-1)], -1)
    rows, h = bucket_divergence(lt, lsb, loss, beta)
    # A token j in bucket b gets p_j / P_b * h_b - p_j * sum(h): the top-K buckets are single
    # tokens (p_j / P_b = 1); tail tokens share h_tail in proportion to their probability, i.e.
    # p_j * (h_tail / P_tail - sum(h)) -- one per-row factor.
    hs = h.sum(-1)
    h_tail = h[:, -1]
    ratio = torch.where(
        tiny, torch.zeros_like(h_tail), h_tail / torch.where(tiny, torch.ones_like(p_tail), p_tail)
    )
    grad = p.mul_(((ratio - hs) * temperature).unsqueeze(-1))
    if any_tiny:  # exact shares exp(ls_j - log P_tail) for those rows
        grad[tiny] += (ls[tiny] - s_tail[tiny].unsqueeze(-1)).exp() * (
            h_tail[tiny] * temperature
        ).unsqueeze(-1)
    grad.scatter_(1, ids, (h[:, :-1] - p_top * hs.unsqueeze(-1)) * temperature)
    return rows.sum() * temperature**2, grad


# ---- a top-K teacher over its whole vocabulary ------------------------------------------------------


def dense_logprobs(teacher: TopK, vocab: int) -> torch.Tensor:
    """A top-K teacher's log-probs over its whole vocabulary: the K log-probs at their ids, and the
    tail's mass spread evenly over the other ``vocab - K`` ids (``tail - log(vocab - K)`` each).

    Exact when K = ``vocab`` (no tail); for K < ``vocab`` the K log-probs and the tail's total mass
    are the teacher's, the shape of the tail is not (every id outside the top-K gets the same
    probability).  What a loss that needs a distribution over the whole vocabulary (the
    cross-tokenizer losses of :mod:`lmkd.losses.uld`) reads where a live teacher's log-softmax goes.

    Args:
        teacher: one row per position.
        vocab: the teacher's vocabulary size ``V``.

    Returns:
        ``(N, V)`` float32 log-probs.

    Raises:
        ValueError: K above ``vocab``, or an id outside it.
    """
    lp = teacher.logprobs.float()
    n, k = lp.shape
    if k > vocab or (teacher.ids.numel() and int(teacher.ids.max()) >= vocab):
        raise ValueError(
            f"a top-{k} teacher whose ids reach {int(teacher.ids.max()) if teacher.ids.numel() else 0} "
            f"does not fit a vocabulary of {vocab}"
        )
    fill = teacher.tail.float() - math.log(vocab - k) if vocab > k else teacher.tail.float()
    out = fill.reshape(n, 1).expand(n, vocab).clone()
    return out.scatter_(1, teacher.ids.long(), lp)


# ---- plain (autograd) top-K loss: the reference of the cached path ----------------------------


def topk_kd_loss(
    student_logits, teacher: TopK, mask=None, *, loss="forward_kl", temperature=1.0, beta=0.5
) -> torch.Tensor:
    """Divergence between a top-K teacher and the student over K + 1 buckets, summed over positions.

    The buckets are the K cached token ids and one **tail bucket** with all other tokens.  The
    teacher's bucket distribution is its K log-probs plus its log tail mass, renormalised (fp16
    rounding) and tempered as K + 1 logits; the student's is its tempered softmax summed into the
    same buckets.  With K = V the tail is empty and this is exactly :func:`lmkd.losses.token_kd_loss`.
    Plain autograd.

    Args:
        student_logits: ``(..., V)``.
        teacher: one row per selected position (in flattened order).
        mask: boolean ``(...)`` of the selected positions (all when None).
        loss: the divergence (one of :data:`TOPK_KD_LOSSES`).
        temperature: its temperature.
        beta: the ``jsd`` mixture weight.

    Returns:
        The 0-dim sum, scaled by ``tau^2``.

    Raises:
        ValueError: a loss a top-K cache does not support (not in :data:`TOPK_KD_LOSSES`).
    """
    if loss not in TOPK_KD_LOSSES:
        raise ValueError(
            f"KD loss {loss!r} needs the teacher's full logits; a top-K cache supports "
            f"{', '.join(TOPK_KD_LOSSES)}"
        )
    v = student_logits.shape[-1]
    s = student_logits
    if mask is not None:
        s = s[mask.to(torch.bool)]
    s = s.reshape(-1, v).float()
    ls = F.log_softmax(s / temperature, -1)
    if _uses_samples(teacher, loss, beta):
        return _sampled_rows(ls, teacher, temperature)[0].sum() * temperature**2
    lt, lsb, _ = _topk_buckets(ls, teacher, temperature)
    rows, _h = bucket_divergence(lt, lsb, loss, beta)
    return rows.sum() * temperature**2
