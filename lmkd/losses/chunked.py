"""Memory-lean KD losses: the token-level losses of :mod:`lmkd.losses` computed chunk by chunk.

The plain losses build several full ``(N, V)`` float32 tensors for both models (log-softmaxes,
probabilities, products) and keep most of them alive for the backward pass; at ``N = 8192`` and
``V = 152k`` that is tens of gigabytes.  Here the loss **and its gradient** with respect to the
student's logits are computed in the forward pass, a chunk of positions at a time, and only the
gradient is kept (in the logits' own dtype); backward just returns it (the pattern of Liger
Kernel's fused losses).  Peak extra memory is one gradient the size of the student's logits plus
a few ``(chunk, V)`` float32 temporaries (see
:data:`lmkd.losses.chunk_forms.DEFAULT_CHUNK_ELEMENTS`).

:func:`lmkd.losses.fused.fused_linear_distill_loss` goes further: it takes the student's final hidden
states and the LM head (:class:`Head`) and computes the logits per chunk too, with this module's
chunks and per-chunk closed forms (:mod:`lmkd.losses.chunk_forms`), so the full
student logits never exist.  The teacher's logits can be given the same way (:class:`LazyLogits`:
its final hidden states and head, computed per chunk under no_grad), so neither model's ``(N, V)``
logits exist whole.

Every divergence of :data:`lmkd.losses.KD_LOSSES` is supported against full teacher logits, plus
hard-label cross-entropy in the same pass (the trainer's objective is
``w_ce * CE_sum + w_kd * KD_sum``); ``forward_kl``/``reverse_kl``/``jsd`` are also supported
against a top-K teacher (``lmkd.teacher.logit_cache``): the KL is then taken between the two
distributions over ``K + 1`` buckets -- the K cached token ids, and one tail bucket holding all
other tokens (see :mod:`lmkd.losses.topk`).  The gradients are closed forms checked against the
plain autograd path in ``tests/test_chunked.py`` -- a fast path never changes the objective.

Conventions are those of :mod:`lmkd.losses`: sums over positions, softmaxes in float32, tau^2
scaling for the KL family, an all-masked batch gives exactly 0 with a 0 gradient.

On accelerators the loss is built for speed as well: chunks sized to the free memory (a few per
batch rather than dozens, :func:`lmkd.losses.chunk_forms.auto_chunk_size`), no host
synchronisation inside the chunk loop, and the per-chunk closed forms compiled with
``torch.compile`` on CUDA GPUs that Triton supports (compute capability >= 7.0; anything else, or
a failed compile, runs them eagerly -- same values).

This module imports torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmkd.core.constants import IGNORE_INDEX
from lmkd.losses.chunk_forms import ChunkSpec, auto_chunk_size, chunk_loss_and_grad, chunk_slices
from lmkd.losses.token import KD_LOSSES
from lmkd.losses.topk import TopK


@dataclass
class LazyLogits:
    """Teacher logits computed per chunk from its final hidden states ``(N, H)`` and head, so the
    teacher's ``(N, V)`` logits never exist whole either (no gradient flows to the teacher).
    Indexing (``lazy[rows]``) gives those rows' logits.

    Args:
        hidden: the teacher's final hidden states ``(N, H)``.
        head: the teacher's output layer.
    """

    hidden: torch.Tensor
    head: Head

    def __getitem__(self, index) -> torch.Tensor:
        with torch.no_grad():
            return self.head.logits(self.hidden[index])


class _ChunkedDistillLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, kd_mask, teacher_logits, topk, spec):
        n, v = logits.shape
        teacher = topk if topk is not None else teacher_logits
        grad = torch.zeros_like(logits) if ctx.needs_input_grad[0] else None
        loss = torch.zeros((), dtype=torch.float32, device=logits.device)
        ce_total, kd_total = loss.clone(), loss.clone()
        for idx, sl, lab, kd_on, t in chunk_slices(
            n, labels, kd_mask, teacher, spec.chunk_size, logits.device
        ):
            part, ce, kd, g = chunk_loss_and_grad(logits[sl].float(), lab, kd_on, t, spec)
            loss += part
            ce_total += ce
            kd_total += kd
            if grad is not None:
                if isinstance(sl, slice):
                    grad[sl] = g
                else:
                    grad.index_copy_(0, idx, g.to(grad.dtype))
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce_total, kd_total)
        return loss, ce_total, kd_total

    @staticmethod
    def backward(ctx, grad_loss, _ce, _kd):
        (grad,) = ctx.saved_tensors
        if grad is not None and not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grad = grad * grad_loss.to(grad.dtype)
        return grad, None, None, None, None, None


def prepare(student_shape, labels, mask, teacher, loss, temperature, beta):
    """Check the settings and flatten the inputs of a pass over logits of ``student_shape``.

    Args:
        student_shape: the student logits' shape ``(..., V)``.
        labels: ``(...)`` labels, or None.
        mask: boolean ``(...)`` KD mask, or None.
        teacher: the teacher's logits ``(..., V_t)``, a :class:`LazyLogits`, a :class:`TopK` over the
            KD positions, or None.
        loss: the KD divergence.
        temperature: its temperature.
        beta: the ``jsd`` mixture weight.

    Returns:
        ``(labels, KD mask, teacher logits or None, top-K teacher over all positions or None)``, flattened.

    Raises:
        ValueError: a temperature <= 0, a ``beta`` outside [0, 1], a loss not in :data:`KD_LOSSES`, a mask
            whose shape is not the logits' leading shape, or a top-K teacher whose rows are not the
            masked positions.
    """
    lead = student_shape[:-1]
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if loss not in KD_LOSSES:
        raise ValueError(f"unknown KD loss {loss!r}; choose one of {', '.join(KD_LOSSES)}")
    if mask is not None:
        if mask.shape != lead:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match logits {tuple(lead)}")
        mask = mask.reshape(-1).to(torch.bool)
    if labels is not None:
        labels = labels.reshape(-1)
    topk = teacher_logits = None
    if isinstance(teacher, TopK):
        topk = _expand_topk(teacher, mask, math.prod(lead))
    elif isinstance(teacher, LazyLogits):
        teacher_logits = teacher
    elif teacher is not None:
        teacher_logits = teacher.reshape(-1, teacher.shape[-1])
    return labels, mask, teacher_logits, topk


def chunked_distill_loss(
    student_logits: torch.Tensor,
    teacher: torch.Tensor | TopK | None = None,
    labels: torch.Tensor | None = None,
    kd_mask: torch.Tensor | None = None,
    *,
    loss: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    kd_vocab: int | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ce_weight * CE_sum + kd_weight * KD_sum`` over chunks of positions, with its exact gradient.

    Args:
        student_logits: ``(..., V)``.
        teacher: the teacher's logits ``(..., V_t)``, a :class:`TopK` over the KD positions (in their
            flattened order), or None (CE only).
        labels: ``(...)`` with ``-100`` for ignored positions, or None (KD only).
        kd_mask: selects the KD positions (None = all).
        loss: the KD divergence (one of :data:`KD_LOSSES`).
        temperature: its temperature.
        beta: the ``jsd`` mixture weight.
        ce_weight: the CE weight.
        kd_weight: the KD weight.
        kd_vocab: restricts KD to the first columns (teacher and student vocabularies differing by
            padding rows).
        chunk_size: positions per chunk (:func:`auto_chunk_size` when None).

    Returns:
        ``(loss, ce_sum, kd_sum)``; only ``loss`` carries a gradient.

    Raises:
        ValueError: a temperature <= 0, a ``beta`` outside [0, 1], a loss not in :data:`KD_LOSSES`, a mask
            whose shape is not the logits' leading shape, or a top-K teacher whose rows are not the
            masked positions.
    """
    v = student_logits.shape[-1]
    labels, kd_mask, t_logits, topk = prepare(
        student_logits.shape, labels, kd_mask, teacher, loss, temperature, beta
    )
    spec = ChunkSpec(
        loss,
        float(temperature),
        float(beta),
        float(ce_weight),
        float(kd_weight),
        kd_vocab,
        auto_chunk_size(v, chunk_size, student_logits.device),
    )
    return _ChunkedDistillLoss.apply(
        student_logits.reshape(-1, v), labels, kd_mask, t_logits, topk, spec
    )


def _expand_topk(topk: TopK, kd_mask, n: int) -> TopK:
    """A TopK given for the KD positions only, scattered to all ``n`` positions (zeros elsewhere)."""
    if kd_mask is None or topk.ids.shape[0] == n:
        return topk
    idx = kd_mask.nonzero().squeeze(-1)
    if idx.numel() != topk.ids.shape[0]:
        raise ValueError(
            f"the top-K teacher has {topk.ids.shape[0]} positions but the mask selects {idx.numel()}"
        )

    def scatter(t):
        out = t.new_zeros((n, *t.shape[1:]))
        out[idx] = t
        return out

    return topk.map(scatter)


def chunked_kd_loss(
    student_logits,
    teacher,
    mask=None,
    *,
    loss="forward_kl",
    temperature=1.0,
    beta=0.5,
    chunk_size=None,
) -> torch.Tensor:
    """Drop-in for :func:`lmkd.losses.token_kd_loss` (same value and gradient), chunked.

    Args:
        student_logits: ``(..., V)``.
        teacher: the teacher's logits ``(..., V)`` or a :class:`TopK` over the masked positions.
        mask: boolean ``(...)`` of the positions that count (all when None).
        loss: the KD divergence (one of :data:`KD_LOSSES`).
        temperature: its temperature.
        beta: the ``jsd`` mixture weight.
        chunk_size: positions per chunk (:func:`auto_chunk_size` when None).

    Returns:
        The 0-dim KD sum.

    Raises:
        ValueError: a temperature <= 0, a ``beta`` outside [0, 1], a loss not in :data:`KD_LOSSES`, a mask
            whose shape is not the logits' leading shape, or a top-K teacher whose rows are not the
            masked positions.
    """
    return chunked_distill_loss(
        student_logits,
        teacher,
        None,
        mask,
        loss=loss,
        temperature=temperature,
        beta=beta,
        ce_weight=0.0,
        chunk_size=chunk_size,
    )[0]


def chunked_cross_entropy(
    logits, labels, ignore_index: int = IGNORE_INDEX, chunk_size=None
) -> torch.Tensor:
    """Drop-in for :func:`lmkd.losses.cross_entropy` (summed), chunked.

    Args:
        logits: ``(..., V)``.
        labels: ``(...)`` label ids.
        ignore_index: the label of positions that count in no loss.
        chunk_size: positions per chunk (:func:`auto_chunk_size` when None).

    Returns:
        The 0-dim CE sum.
    """
    if ignore_index != IGNORE_INDEX:
        labels = torch.where(labels.eq(ignore_index), torch.full_like(labels, IGNORE_INDEX), labels)
    return chunked_distill_loss(logits, None, labels, None, kd_weight=0.0, chunk_size=chunk_size)[0]


# ---- the LM head, for the logits computed per chunk (lmkd.losses.fused, LazyLogits) ------------


@dataclass
class Head:
    """The student's output layer as the plain model applies it:
    ``z = (hidden @ weight.T + bias + extra_bias) * scale``, then ``cap * tanh(z / cap)`` when
    ``softcap`` is set (Gemma's final soft-capping; Cohere's ``logit_scale``; Marian's
    ``final_logits_bias`` as ``extra_bias``).

    Args:
        weight: ``(V, H)``.
        bias: ``(V,)``, or None.
        extra_bias: added after the bias (Marian's ``final_logits_bias``), or None.
        scale: the logit scale.
        softcap: the soft-cap ``cap``, or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    extra_bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The full logits (the plain path, for reference and for checks).

        Args:
            hidden: ``(..., H)`` final hidden states.

        Returns:
            ``(..., V)`` logits.
        """
        z = F.linear(hidden, self.weight, self.bias)
        if self.extra_bias is not None:
            z = z + self.extra_bias
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z
