"""The chunks of a chunked CE+KD pass and what each computes: the chunk size
(:func:`auto_chunk_size`), the chunks skipping unused positions (:func:`chunk_slices`), and the
closed-form loss and gradient of one chunk (:class:`ChunkSpec`, :func:`chunk_loss_and_grad`; compiled
with ``torch.compile`` where Triton runs, :mod:`lmkd.losses.compiling`).

:mod:`lmkd.losses.chunked` (logits given) and :mod:`lmkd.losses.fused` (logits computed per chunk)
run their passes with these; the closed forms are checked against the plain autograd path in
``tests/test_chunked.py``.  This module imports torch only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lmkd.core.constants import IGNORE_INDEX
from lmkd.losses.compiling import Compiled
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
        loss: the KD divergence (one of :data:`lmkd.losses.KD_LOSSES`).
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
        teacher: the teacher over all ``n`` positions (logits,
            :class:`lmkd.losses.chunked.LazyLogits`, :class:`TopK`), or None.
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
