"""The rules every loop that runs a model over inputs shares: EOS, padding, length-sorted batching.

:mod:`lmkd.models.generation` (``lmkd evaluate``, on-policy KD) and :mod:`lmkd.models.nbest`
(``lmkd generate``) take these from here:

* **EOS**: :func:`eos_token_ids` -- the ids of the model's generation config, else of its config
  (one id or a list); a generated sequence counts up to and including its first EOS
  (:func:`trim_at_eos` for token lists, :func:`eos_mask` for tensors);
* **padding**: :func:`pad_token_id` -- the tokenizer's pad (else its EOS) when the inputs were
  tokenised by it, else the model's pad id, its lowest EOS id, or 0;
* **batching**: :func:`longest_first` orders inputs by length and :func:`length_batches` cuts that
  order into batches of ``batch_size`` rows and/or at most ``max_tokens`` padded tokens, so a batch
  holds inputs of similar length (little padding) and the largest batch comes first (an early OOM).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lmkd.core.errors import LmkdError
from lmkd.models.loading import unwrap


def eos_setting(model) -> int | list[int] | None:
    """The model's EOS setting as its configs hold it: its generation config's, else its config's.

    Args:
        model: the model (or a wrapper).

    Returns:
        One id, a list of ids, or None.
    """
    model = unwrap(model)
    eos = model.generation_config.eos_token_id
    return eos if eos is not None else model.config.eos_token_id


def eos_token_ids(model) -> set[int]:
    """The model's end-of-sequence ids: its generation config's, else its config's (one or a list).

    Args:
        model: the model.

    Returns:
        The ids (empty when it has none).
    """
    eos = eos_setting(model)
    return set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))


def pad_token_id(model, tokenizer=None) -> int:
    """The id to pad with.

    Args:
        model: the model.
        tokenizer: the tokenizer of the inputs, if any.

    Returns:
        The tokenizer's pad (else EOS) id when ``tokenizer`` is given (inputs it tokenised), else the
        model's pad id (generation config, then config), its lowest EOS id, or 0.

    Raises:
        LmkdError: the tokenizer has neither a pad nor an EOS token.
    """
    if tokenizer is not None:
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        if pad is None:
            raise LmkdError(
                "the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token"
            )
        return pad
    model = unwrap(model)
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.config.pad_token_id
    if pad is None:
        eos = eos_token_ids(model)
        pad = min(eos) if eos else 0
    return pad


def trim_at_eos(tokens: list[int], eos: set[int], pad_id: int) -> list[int]:
    """Generated tokens up to and including the first EOS (without one: trailing padding removed).

    Args:
        tokens: the generated ids of one row.
        eos: the EOS ids.
        pad_id: the padding id.

    Returns:
        The trimmed ids.
    """
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    while tokens and tokens[-1] == pad_id and pad_id not in eos:
        tokens = tokens[:-1]
    return tokens


def eos_mask(new: torch.Tensor, eos: set[int]) -> torch.Tensor:
    """The tensor form of :func:`trim_at_eos`.

    Args:
        new: the generated tokens ``(B, T)``.
        eos: the EOS ids.

    Returns:
        Boolean ``(B, T)``: True at the tokens that count, up to and including each row's first EOS.
    """
    is_eos = torch.zeros_like(new, dtype=torch.bool)
    for e in eos:
        is_eos |= new.eq(e)
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS tokens strictly before
    return before.eq(0)


def longest_first(lengths: Sequence[int]) -> list[int]:
    """Indices of the inputs, longest first (ties in input order).

    Args:
        lengths: the inputs' lengths.

    Returns:
        The indices.
    """
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def length_batches(
    order: list[int],
    lengths: Sequence[int],
    batch_size: int | None = None,
    max_tokens: int | None = None,
) -> Iterator[list[int]]:
    """Consecutive slices of ``order``: ``batch_size`` rows, or as many as fit ``max_tokens`` padded
    input tokens (and at most ``batch_size`` rows when both are given).

    Args:
        order: the input indices, in the order to batch them.
        lengths: the length of each input (by index).
        batch_size: the most rows per batch.
        max_tokens: the most padded input tokens per batch.

    Returns:
        An iterator of lists of indices.
    """
    i = 0
    while i < len(order):
        if max_tokens is None:
            j = min(i + batch_size, len(order))
        else:
            j, longest = i + 1, lengths[order[i]]
            while j < len(order) and (j + 1 - i) * max(longest, lengths[order[j]]) <= max_tokens:
                longest = max(longest, lengths[order[j]])
                j += 1
            if batch_size is not None:
                j = min(j, i + batch_size)
        yield order[i:j]
        i = j


def pad_batch(
    seqs: list[list[int]], pad_id: int, left: bool, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as ``(input_ids, attention_mask)`` padded with ``pad_id`` on the left or right.

    Args:
        seqs: the token lists.
        pad_id: the padding id.
        left: pad on the left (causal LMs) instead of the right.
        device: where the tensors go.

    Returns:
        ``(input_ids, attention_mask)``, both ``(len(seqs), longest)``.
    """
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if left:
            ids[i, width - len(s) :] = torch.tensor(s)
            mask[i, width - len(s) :] = 1
        else:
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def device_of(model) -> torch.device:
    """The device of a model's parameters.

    Args:
        model: the model.

    Returns:
        The device of its first parameter.
    """
    return next(model.parameters()).device
