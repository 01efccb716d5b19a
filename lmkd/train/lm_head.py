"""The LM head run inside the loss: find a model's head, check it reproduces its logits, skip it.

The fused and chunked losses (:mod:`lmkd.losses.fused`, :mod:`lmkd.losses.chunked`) compute logits
per chunk from the final hidden states, so no (N, V) tensor is made.  That is only the same
objective when lmkd's :class:`lmkd.losses.chunked.Head` reproduces the model's own head, which is
checked once per model on a small no-grad forward (:func:`probe_inputs`, :func:`check_head`);
:func:`head_skipped` then replaces the head in the forward by a recorder of its inputs.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from lmkd.core.constants import CAUSAL, SEQ2SEQ
from lmkd.losses import chunked
from lmkd.models.loading import unwrap

logger = logging.getLogger("lmkd.train.objective")  # (the log lines kept their logger)

#: positions of the one-row slice of the first batch on which a model's fused LM head is checked
PROBE_POSITIONS = 32


def probe_inputs(
    kind: str, fwd: dict, attention_mask=None, positions: int = PROBE_POSITIONS
) -> dict:
    """The forward keywords ``fwd`` of a batch cut to one row and at most ``positions`` positions.

    One row (its longest) and at most ``positions`` of the positions whose logits the model returns
    (a causal LM's tokens, a seq2seq model's decoder tokens; the encoder's input stays whole): the
    real forward on it yields (1, positions, V) logits.

    Args:
        kind: the model kind (seq2seq: the decoder's tokens are cut).
        fwd: the batch's forward keywords.
        attention_mask: the batch's attention mask (picks a causal LM's longest row and whether it
            is left-padded, where the last positions are kept); None: the first row and its first
            positions.
        positions: the most positions kept.

    Returns:
        The cut forward keywords (tensors without the batch dimension are kept as they are).
    """
    seq_key = "decoder_input_ids" if kind == SEQ2SEQ else "input_ids"
    ref = fwd.get(seq_key)
    if ref is None:
        ref = fwd.get("decoder_inputs_embeds" if kind == SEQ2SEQ else "inputs_embeds")
    b, t = ref.shape[:2]
    row = (
        int(attention_mask.sum(-1).argmax())
        if attention_mask is not None and kind != SEQ2SEQ
        else 0
    )
    # right padding (or none): the first positions are real tokens; left padding: the last ones
    left = kind != SEQ2SEQ and attention_mask is not None and not bool(attention_mask[row, 0])
    cut = slice(max(0, t - positions), t) if left else slice(0, min(t, positions))
    out = {}
    for k, v in fwd.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b:
            v = v[row : row + 1]
            if v.dim() >= 2 and v.shape[1] == t and (kind != SEQ2SEQ or k.startswith("decoder_")):
                v = v[:, cut]
        out[k] = v
    return out


def head_for_fused_loss(model, kind: str, sharded: bool = False, data_parallel: bool = False):
    """The LM head of ``model`` as lmkd.losses.chunked.Head, or (None, why not).

    Args:
        model: the student or the teacher.
        kind: the model kind.
        sharded: whether the model is sharded (FSDP / DeepSpeed).
        data_parallel: whether the model is wrapped for data parallelism (DDP; only the student).

    Returns:
        (Head, "") or (None, the reason the head cannot run inside the loss).
    """
    m = unwrap(model)
    if kind not in (CAUSAL, SEQ2SEQ):
        return None, f"{kind} models are not supported"
    if sharded:
        return None, "the head is sharded (FSDP/DeepSpeed)"
    if data_parallel:
        # the fused loss differentiates the head outside DDP's forward, so DDP's gradient hooks
        # would fire twice for the (tied) head weight
        return None, "the student is wrapped for data parallelism (DDP)"
    head = m.get_output_embeddings()
    if type(head) is not nn.Linear:
        return None, f"the output layer is a {type(head).__name__}, not a plain nn.Linear"
    cfg = m.config.get_text_config() if hasattr(m.config, "get_text_config") else m.config
    scale = getattr(cfg, "logit_scale", None)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    extra = getattr(m, "final_logits_bias", None)
    return chunked.Head(
        head.weight,
        head.bias,
        extra if isinstance(extra, torch.Tensor) else None,
        float(scale) if isinstance(scale, (int, float)) else 1.0,
        float(softcap) if softcap else None,
    ), ""


@contextlib.contextmanager
def head_skipped(model, decided):
    """Around a forward of ``model``: with ``decided`` a Head, the LM head only records its input
    and returns zeros of width 1 (Marian/BART's final_logits_bias is swapped for a (1, 1) zero
    meanwhile, so no (B, T, V) tensor is made); with ``decided`` None a hook records the head's
    input so the caller can check the fused head against the model's real logits.

    Args:
        model: the student or the teacher (possibly wrapped).
        decided: the checked :class:`lmkd.losses.chunked.Head`, or None to probe.

    Returns:
        A context manager yielding a box: ``box["hidden"]`` collects the head's inputs and
        ``box["probe"]`` says whether this is a probe.
    """
    module = unwrap(model).get_output_embeddings()
    box = {"hidden": [], "probe": decided is None}
    if box["probe"]:
        handle = module.register_forward_hook(lambda m, args, out: box["hidden"].append(args[0]))
        try:
            yield box
        finally:
            handle.remove()
        return
    inner = unwrap(model)
    swap = "final_logits_bias" in inner._buffers
    width = 1 if (not swap or inner is model) else module.out_features  # never swap under a wrapper
    swap = swap and width == 1

    def skip(hidden, *a, **k):
        box["hidden"].append(hidden)
        return hidden.new_zeros(()).expand(*hidden.shape[:-1], width)

    bias = inner._buffers.get("final_logits_bias")
    module.forward = skip
    if swap:
        inner._buffers["final_logits_bias"] = bias.new_zeros(1, 1)
    try:
        yield box
    finally:
        del module.forward
        if swap:
            inner._buffers["final_logits_bias"] = bias


def check_head(box, outputs, who: str, found):
    """Once per model: does lmkd.losses.chunked.Head reproduce the model's logits?

    Args:
        box: the head inputs :func:`head_skipped` recorded in a forward (None without one).
        outputs: that forward's outputs.
        who: ``"student"`` or ``"teacher"`` (for the log line).
        found: what :func:`head_for_fused_loss` returned.

    Returns:
        The Head, or False (the head cannot run inside the loss; logged once).
    """
    head, why = found
    if head is not None and len(box["hidden"]) != 1:
        head, why = None, "the LM head is called more than once per forward"
    if head is not None:
        with torch.no_grad():
            real = outputs.logits.float()
            mine = head.logits(box["hidden"][0]).float()
            tol = (
                1e-4 if real.dtype == torch.float32 and head.weight.dtype == torch.float32 else 1e-2
            )
            ok = mine.shape == real.shape and bool(
                (mine - real).abs().max() <= tol * real.abs().max().clamp(min=1.0)
            )
        if not ok:
            head, why = None, "the model transforms its logits in a way lmkd cannot reproduce"
    if head is None:
        if who == "student":
            logger.info(
                "fused linear KD loss off (%s); using the chunked loss on the full logits -- the "
                "same objective",
                why,
            )
        else:
            logger.info("teacher logits computed whole, not per chunk (%s)", why)
    return head if head is not None else False
