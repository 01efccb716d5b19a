"""Memory-lean KD losses: the token-level losses of :mod:`lmkd.losses` computed chunk by chunk.

The plain losses build several full ``(N, V)`` float32 tensors for both models (log-softmaxes,
probabilities, products) and keep most of them alive for the backward pass; at ``N = 8192`` and
``V = 152k`` that is tens of gigabytes.  Here the loss **and its gradient** with respect to the
student's logits are computed in the forward pass, a chunk of positions at a time, and only the
gradient is kept (in the logits' own dtype); backward just returns it (the pattern of Liger
Kernel's fused losses).  Peak extra memory is one gradient the size of the student's logits plus
a few ``(chunk, V)`` float32 temporaries (see :data:`DEFAULT_CHUNK_ELEMENTS`).

:func:`lmkd.losses.fused.fused_linear_distill_loss` goes further: it takes the student's final hidden
states and the LM head (:class:`Head`) and computes the logits per chunk too, with this module's
chunks (:func:`chunk_slices`) and per-chunk closed forms (:func:`chunk_loss_and_grad`), so the full
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
batch rather than dozens, :func:`auto_chunk_size`), no host synchronisation inside the chunk loop,
and the per-chunk closed forms compiled with ``torch.compile`` on CUDA GPUs that Triton supports
(compute capability >= 7.0; anything else, or a failed compile, runs them eagerly -- same values).

This module imports torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmkd.core.constants import IGNORE_INDEX
from lmkd.losses.compiling import Compiled
from lmkd.losses.token import KD_LOSSES
from lmkd.losses.topk import TopK, bucket_divergence, topk_kd_chunk

#: default chunk: about this many logits (positions x vocabulary) per chunk.  On CPU 1M fp32
#: (4 MB per temporary: measured fastest -- larger chunks pay page faults on fresh allocations,
#: smaller ones per-chunk overhead); on accelerators 8M (32 MB), negligible next to their memory
#: and large enough to keep kernels busy.
DEFAULT_CHUNK_ELEMENTS = {"cpu": 1 << 20}
DEFAULT_CHUNK_ELEMENTS_ACCELERATOR = 1 << 23
#: on a CUDA GPU a chunk's float32 temporaries (about CHUNK_TEMPORARIES tensors of (chunk, V)) take
#: up to this share of the free memory, within ACCELERATOR_CHUNK_RANGE logits per chunk
ACCELERATOR_CHUNK_SHARE = 0.02
CHUNK_TEMPORARIES = 6
ACCELERATOR_CHUNK_RANGE = (1 << 23, 1 << 27)


def auto_chunk_size(
    vocab: int,
    chunk_size: int | None = None,
    device: torch.device | str = "cpu",
    free_bytes: int | None = None,
) -> int:
    """Positions per chunk.

    Args:
        vocab: the logits' columns.
        chunk_size: the positions per chunk when given and > 0.
        device: where the logits are.
        free_bytes: the free memory to plan for (default, on a CUDA GPU: its free memory).

    Returns:
        ``chunk_size`` when given and > 0; else ~1M logits per chunk on CPU; on a CUDA GPU (or with
        ``free_bytes``) as many as fit in ACCELERATOR_CHUNK_SHARE of ``free_bytes``, 8M to 128M logits;
        8M on other accelerators -- divided by ``vocab``, at least 1.
    """
    if chunk_size and chunk_size > 0:
        return int(chunk_size)
    dev = torch.device(device)
    elements = DEFAULT_CHUNK_ELEMENTS.get(dev.type, DEFAULT_CHUNK_ELEMENTS_ACCELERATOR)
    if dev.type == "cuda" or free_bytes is not None:
        if free_bytes is None:
            free_bytes = torch.cuda.mem_get_info(dev)[0]
        lo, hi = ACCELERATOR_CHUNK_RANGE
        elements = min(
            hi, max(lo, int(free_bytes * ACCELERATOR_CHUNK_SHARE) // (4 * CHUNK_TEMPORARIES))
        )
    return max(1, elements // max(1, vocab))


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


# ---- closed-form per-chunk losses and gradients -------------------------------------------------


def _kd_full(s: torch.Tensor, t: torch.Tensor, loss: str, temperature: float, beta: float):
    """(sum of the divergence, gradient w.r.t. ``s``) for float32 logits ``s``, ``t`` of ``(n, V)``."""
    if loss == "mse":
        diff = s - t
        v = s.shape[-1]
        return diff.pow(2).mean(-1).sum(), diff.mul_(2.0 / v)
    if temperature != 1.0:
        s, t = s / temperature, t / temperature
    ls = F.log_softmax(s, -1)
    lt = F.log_softmax(t, -1)
    if loss == "forward_kl" or (loss == "jsd" and beta == 0.0):
        pt = lt.exp()
        if (
            s.device.type != "cpu"
        ):  # no host sync (and one graph for torch.compile): 0 * log 0 counts as 0
            total = torch.where(pt > 0, pt * (lt - ls), 0.0).sum()
        else:
            total = F.kl_div(ls, lt, reduction="sum", log_target=True)  # one fused pass
            if not torch.isfinite(total):  # -inf teacher log-probs: 0 * log 0 must count as 0
                total = torch.where(pt > 0, pt * (lt - ls), 0.0).sum()
        grad = ls.exp_().sub_(pt)
        return total * temperature**2, grad.mul_(temperature)
    rows, h = bucket_divergence(lt, ls, loss, beta)
    # dL/dz_j = p_j * (g_j - sum_i p_i g_i) with h = p * g; times tau^2 / tau for z = s * tau
    grad = h - ls.exp() * h.sum(-1, keepdim=True)
    return rows.sum() * temperature**2, grad.mul_(temperature)


def _ce(s: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """(summed cross-entropy, gradient) for float32 logits ``s`` (n, V) and labels (n,)."""
    valid = labels.ne(ignore_index)
    ls = F.log_softmax(s, -1)
    safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(-1)
    total = -(ls.gather(1, safe).squeeze(-1) * valid).sum()
    grad = ls.exp_()
    grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
    if s.device.type != "cpu" or not bool(
        valid.all()
    ):  # off CPU: no host sync, the product is cheap
        grad.mul_(valid.unsqueeze(-1))
    return total, grad


_kd_full_fast = Compiled(_kd_full)
_ce_fast = Compiled(_ce)


@dataclass
class ChunkSpec:
    """What every chunk of one pass computes.

    Args:
        loss: the KD divergence (one of :data:`KD_LOSSES`).
        temperature: its temperature.
        beta: the ``jsd`` mixture weight.
        w_ce: the CE weight.
        w_kd: the KD weight.
        kd_vocab: the KD vocabulary (None: all columns).
        chunk_size: the positions per chunk.
    """

    loss: str
    temperature: float
    beta: float
    w_ce: float
    w_kd: float
    kd_vocab: int | None
    chunk_size: int


def chunk_loss_and_grad(s: torch.Tensor, labels, kd_on, teacher, spec: ChunkSpec):
    """The loss and its gradient for one chunk of float32 logits.

    Args:
        s: the chunk's float32 student logits ``(n, V)``.
        labels: its labels ``(n,)`` (``-100`` ignored), or None (no CE).
        kd_on: boolean ``(n,)`` of its KD rows, or None: every row is a KD row (decided once per batch,
            so no host sync per chunk).
        teacher: its teacher rows: logits ``(n, V_t)``, a :class:`TopK`, or None (no KD).
        spec: the pass's settings.

    Returns:
        ``(weighted loss, CE sum, KD sum, d(weighted loss)/ds)``.
    """
    grad = None
    ce_sum = s.new_zeros(())
    kd_sum = s.new_zeros(())
    if labels is not None and spec.w_ce != 0:
        ce_sum, grad = _ce_fast(s, labels)
        grad.mul_(spec.w_ce)
    # kd_on None: every row of the chunk is a KD row (decided once per batch: no host sync per chunk)
    if teacher is not None and spec.w_kd != 0 and (kd_on is None or bool(kd_on.any())):
        sel = None if kd_on is None else kd_on.nonzero().squeeze(-1)
        all_rows = sel is None or sel.numel() == kd_on.numel()
        v = spec.kd_vocab or s.shape[-1]
        s_kd = s[:, :v] if all_rows else s[sel, :v]
        if isinstance(teacher, TopK):
            t_kd = teacher if all_rows else teacher.rows(sel)
            kd_sum, g = topk_kd_chunk(s_kd, t_kd, spec.loss, spec.temperature, spec.beta)
        else:
            t_kd = (teacher if all_rows else teacher[sel])[:, :v].float()
            kd_sum, g = _kd_full_fast(s_kd, t_kd, spec.loss, spec.temperature, spec.beta)
        if all_rows and v == s.shape[-1]:
            grad = g.mul_(spec.w_kd) if grad is None else grad.add_(g, alpha=spec.w_kd)
        else:
            grad = torch.zeros_like(s) if grad is None else grad
            grad[slice(None) if sel is None else sel, :v] += g * spec.w_kd
    if grad is None:
        grad = torch.zeros_like(s)
    return spec.w_ce * ce_sum + spec.w_kd * kd_sum, ce_sum, kd_sum, grad


def _rows(n: int, labels, kd_mask, has_teacher: bool, device):
    """Indices of the positions any term uses (so fully padded positions cost nothing)."""
    if has_teacher and kd_mask is None:
        return torch.arange(n, device=device)
    used = torch.zeros(n, dtype=torch.bool, device=device)
    if labels is not None:
        used |= labels.ne(IGNORE_INDEX)
    if has_teacher:
        used |= kd_mask
    return used.nonzero().squeeze(-1)


def _all_kd(kd_mask, rows, dense: bool) -> bool:
    """Whether every used row is a KD row (one host sync per batch, so none per chunk)."""
    return kd_mask is None or bool((kd_mask if dense else kd_mask[rows]).all())


def _gather_teacher(teacher, index):
    if teacher is None:
        return None
    if isinstance(teacher, TopK):
        return teacher.rows(index)
    return teacher[index]


def chunk_slices(n: int, labels, kd_mask, teacher, chunk_size: int, device):
    """The chunks of one pass over ``n`` flattened positions, skipping those no term uses.

    Args:
        n: the flattened positions.
        labels: ``(n,)`` labels (``-100`` ignored), or None.
        kd_mask: boolean ``(n,)`` of the KD positions, or None (all).
        teacher: the teacher over all ``n`` positions (logits, :class:`LazyLogits`, :class:`TopK`), or None.
        chunk_size: the positions per chunk.
        device: where the row indices go.

    Returns:
        A generator of, per chunk: its row indices, where it sits in the flat tensors (a slice when
        every position is used, else those indices), its labels, its KD rows (None: all of them), its
        teacher rows.
    """
    rows = _rows(n, labels, kd_mask, teacher is not None, device)
    dense = rows.numel() == n  # every position is used: slices (views) instead of gathers
    all_kd = _all_kd(kd_mask, rows, dense)
    for start in range(0, rows.numel(), chunk_size):
        idx = rows[start : start + chunk_size]
        sl = slice(start, start + idx.numel()) if dense else idx
        yield (
            idx,
            sl,
            labels[sl] if labels is not None else None,
            None if all_kd else kd_mask[sl],
            _gather_teacher(teacher, sl),
        )


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
