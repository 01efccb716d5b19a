"""Which positions of a batch each loss term covers: the CE and KD masks, and the causal shift
(:func:`shifted`, :func:`shifted_labels`).

Pure functions of (model kind, batch, ``mlm_kd_positions``); the trainer, the regimes and the
feature losses all take their positions from here, so the token counts that normalise the loss
and the masks the loss is summed over cannot disagree.
"""

from __future__ import annotations

import torch

from lmkd.core.constants import CAUSAL, CLASSIFICATION, IGNORE_INDEX, MLM
from lmkd.core.errors import LmkdError


def shifted(kind: str, logits: torch.Tensor) -> torch.Tensor:
    """``logits`` (or hidden states) at the positions the masks cover, after the causal shift by one.

    A causal LM's last position predicts nothing, so it is dropped; other kinds are returned as
    they are.  (Not to be confused with :mod:`lmkd.teacher.cross_tokenizer`'s alignment of two
    tokenizers' positions.)

    Args:
        kind: the model kind (:data:`lmkd.core.constants.CAUSAL`, ...).
        logits: ``(B, T, ...)`` logits, hidden states or per-position values.

    Returns:
        ``logits[:, :-1]`` for a causal LM, else ``logits``.
    """
    return logits[:, :-1] if kind == CAUSAL else logits


def shifted_labels(kind: str, labels: torch.Tensor) -> torch.Tensor:
    """The labels at the shifted positions (a causal LM's position t predicts token t + 1).

    Args:
        kind: the model kind.
        labels: ``(B, T)`` label ids.

    Returns:
        ``labels[:, 1:]`` for a causal LM, else ``labels``.
    """
    return labels[:, 1:] if kind == CAUSAL else labels


def token_mask(inputs: dict, shift: bool = False) -> torch.Tensor:
    """The real (non-padding) tokens of a batch, from its attention mask (all when it has none).

    Args:
        inputs: the batch (``attention_mask``, else ``input_ids`` for the shape).
        shift: drop the first position, as the causal alignment does.

    Returns:
        A ``(B, T)`` (``(B, T - 1)`` shifted) boolean mask.
    """
    att = inputs.get("attention_mask")
    mask = att.bool() if att is not None else torch.ones_like(inputs["input_ids"], dtype=torch.bool)
    return mask[:, 1:] if shift else mask


def position_masks(
    kind: str, inputs: dict, mlm_kd_positions: str = "all"
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(CE mask, KD mask) over the shifted positions of a batch -- the logits' leading shape
    after the causal shift.  The CE mask is None when the batch has no labels.

    classification: one position per example; causal: the labelled next tokens (all real
    tokens without labels); mlm: CE on the masked tokens, KD on every real token
    (``mlm_kd_positions: all``) or the masked ones (``masked``); seq2seq: every target token.

    Args:
        kind: the model kind (:data:`lmkd.core.constants.CAUSAL`, ...).
        inputs: the batch (``input_ids``, ``attention_mask``, ``labels``).
        mlm_kd_positions: ``all`` or ``masked`` (MLM only).

    Returns:
        ``(ce_mask or None, kd_mask)``, boolean tensors.

    Raises:
        LmkdError: a seq2seq batch without labels.
    """
    labels = inputs.get("labels")
    if kind == CLASSIFICATION:
        n = inputs["input_ids"].shape[0]
        kd = torch.ones(n, dtype=torch.bool, device=inputs["input_ids"].device)
        return (kd if labels is not None else None), kd
    if kind == CAUSAL:
        if labels is not None:
            ce = labels[:, 1:].ne(IGNORE_INDEX)
            return ce, ce
        return None, token_mask(inputs, shift=True)
    if kind == MLM:
        ce = labels.ne(IGNORE_INDEX) if labels is not None else None
        if mlm_kd_positions == "masked" and ce is not None:
            return ce, ce
        return ce, token_mask(inputs)
    # seq2seq: one position per target token
    if labels is None:
        raise LmkdError("a seq2seq batch needs labels (the target tokens)")
    ce = labels.ne(IGNORE_INDEX)
    return ce, ce
