"""The fused-linear CE + KD loss: :mod:`lmkd.losses.chunked`'s pass with the LM head run per chunk.

:func:`fused_linear_distill_loss` takes the student's final hidden states and its LM head
(:class:`lmkd.losses.chunked.Head`: weight, optional bias, optional extra bias such as Marian's
``final_logits_bias``, logit scale, final soft-capping) and computes the logits one chunk of
positions at a time, so the student's ``(N, V)`` logits never exist whole; the gradients with
respect to the hidden states, the head weight and bias are accumulated per chunk.  The chunks, the
per-chunk closed forms and the teachers it accepts (full logits, :class:`lmkd.losses.chunked.LazyLogits`,
top-K) are those of :func:`lmkd.losses.chunked.chunked_distill_loss`, whose value and gradient it
reproduces (``tests/test_chunked.py``).

This module imports torch only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmkd.losses.chunk_forms import ChunkSpec, auto_chunk_size, chunk_loss_and_grad, chunk_slices
from lmkd.losses.chunked import Head, prepare
from lmkd.losses.topk import TopK

#: the fused-linear loss uses at least this many positions per chunk (see fused_linear_distill_loss)
FUSED_MIN_CHUNK = 128


class _FusedLinearDistillLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, kd_mask, teacher_logits, topk, head, spec):
        n, _ = hidden.shape
        teacher = topk if topk is not None else teacher_logits
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        )
        grad_b = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        )
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        ce_total, kd_total = loss.clone(), loss.clone()
        for idx, sl, lab, kd_on, t in chunk_slices(
            n, labels, kd_mask, teacher, spec.chunk_size, hidden.device
        ):
            h = hidden[sl]
            z = F.linear(h, weight, bias)
            if head.extra_bias is not None:
                z = z + head.extra_bias
            z = z.float()
            if head.scale != 1.0:
                z = z * head.scale
            if head.softcap:
                th = torch.tanh(z / head.softcap)
                z = th * head.softcap
            part, ce, kd, g = chunk_loss_and_grad(z, lab, kd_on, t, spec)
            loss += part
            ce_total += ce
            kd_total += kd
            if head.softcap:
                g.mul_(1 - th * th)
            if head.scale != 1.0:
                g.mul_(head.scale)
            if grad_h is not None:
                gh = (g.to(weight.dtype) @ weight).to(grad_h.dtype)
                if isinstance(sl, slice):
                    grad_h[sl] = gh
                else:
                    grad_h.index_copy_(0, idx, gh)
            if grad_w is not None:
                grad_w.addmm_(g.t(), h.float())
            if grad_b is not None:
                grad_b.add_(g.sum(0))
        ctx.save_for_backward(
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
        )
        ctx.mark_non_differentiable(ce_total, kd_total)
        return loss, ce_total, kd_total

    @staticmethod
    def backward(ctx, grad_loss, _ce, _kd):
        grads = list(ctx.saved_tensors)
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grads = [g * grad_loss.to(g.dtype) if g is not None else None for g in grads]
        return grads[0], grads[1], grads[2], None, None, None, None, None, None


def fused_linear_distill_loss(
    hidden: torch.Tensor,
    head: Head,
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
    """:func:`lmkd.losses.chunked.chunked_distill_loss` of ``head.logits(hidden)`` without materialising
    those logits.

    Args:
        hidden: ``(..., H)``: the student's final hidden states (what its head receives).
        head: the student's output layer.
        teacher: the teacher's logits ``(..., V_t)``, a :class:`lmkd.losses.chunked.LazyLogits`, a
            :class:`~lmkd.losses.topk.TopK` over the KD positions, or None (CE only).
        labels: ``(...)`` with ``-100`` for ignored positions, or None (KD only).
        kd_mask: selects the KD positions (None = all).
        loss: the KD divergence (one of :data:`lmkd.losses.token.KD_LOSSES`).
        temperature: its temperature.
        beta: the ``jsd`` mixture weight.
        ce_weight: the CE weight.
        kd_weight: the KD weight.
        kd_vocab: restricts KD to the first columns (vocabularies differing by padding rows).
        chunk_size: positions per chunk (:func:`lmkd.losses.chunk_forms.auto_chunk_size` when None).

    Returns:
        ``(loss, ce_sum, kd_sum)``; gradients flow from ``loss`` to ``hidden``, ``head.weight`` and
        ``head.bias``.

    Raises:
        ValueError: the settings :func:`lmkd.losses.chunked.prepare` refuses.
    """
    h = hidden.shape[-1]
    v = head.weight.shape[0]
    shape = (*hidden.shape[:-1], v)
    labels, kd_mask, t_logits, topk = prepare(
        shape, labels, kd_mask, teacher, loss, temperature, beta
    )
    # Each chunk also adds its (V, H) share to the head's gradient: at least FUSED_MIN_CHUNK rows per
    # chunk keep that accumulation small next to the chunk's matmuls (8 rows at V=128k ran 2.3x slower).
    rows = auto_chunk_size(v, chunk_size, hidden.device)
    if not (chunk_size and chunk_size > 0):
        rows = max(rows, FUSED_MIN_CHUNK)
    spec = ChunkSpec(
        loss, float(temperature), float(beta), float(ce_weight), float(kd_weight), kd_vocab, rows
    )
    return _FusedLinearDistillLoss.apply(
        hidden.reshape(-1, h), head.weight, head.bias, labels, kd_mask, t_logits, topk, head, spec
    )
