"""How long an input may be: the one truncation rule of every command.

Every path that tokenises text for a model (evaluate, generate, cache-logits, distill, on-policy
KD, and the study through them) truncates to ``fit_length(the user's maximum, the model(s))``:
the smaller of the two.  What a model takes is its table of learned or fixed positions
(``max_position_embeddings``; GPT-2's ``n_positions`` maps to it), less what the architecture
reserves (RoBERTa-style models number positions from ``padding_idx + 1``), and the tokenizer's
``model_max_length`` when that is a real limit.  Relative positions (T5) have no table.  The rows
cut are counted and reported once per command (:func:`truncation_note`, :func:`describe_truncation`).
"""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig

from lmkd.core.errors import LmkdError
from lmkd.models.loading import check_model_path, unwrap

#: model types whose absolute positions start at ``padding_idx + 1`` (RoBERTa's
#: ``create_position_ids_from_input_ids``): their table holds ``max_position_embeddings - padding_idx - 1``
PADDING_OFFSET_TYPES = frozenset(
    {
        "roberta",
        "xlm-roberta",
        "xlm-roberta-xl",
        "camembert",
        "roberta-prelayernorm",
        "data2vec-text",
        "ibert",
        "longformer",
        "xmod",
        "mpnet",
        "esm",
        "luke",
        "lilt",
        "markuplm",
        "layoutlmv3",
    }
)

#: a tokenizer's ``model_max_length`` at or above this is transformers' "no limit" placeholder
_NO_TOKENIZER_LIMIT = 10**9


def _configs(model_or_config) -> list:
    """The config(s) behind a model, wrapper (ensemble, cohort), config, path, or a list of them."""
    if model_or_config is None:
        return []
    if isinstance(model_or_config, (list, tuple)):
        return [c for x in model_or_config for c in _configs(x)]
    if isinstance(model_or_config, (str, os.PathLike)):
        path = str(model_or_config)
        check_model_path(path)
        try:
            return [AutoConfig.from_pretrained(path)]
        except (OSError, ValueError) as e:
            raise LmkdError(
                f"cannot read a model config from {path}: {str(e).splitlines()[0]}"
            ) from e
    if isinstance(model_or_config, torch.nn.Module):
        model = unwrap(model_or_config)
        for name in (
            "teachers",
            "members",
        ):  # lmkd's EnsembleTeacher / CohortModel: every one must fit
            inner = getattr(model, name, None)
            if isinstance(inner, torch.nn.ModuleList):
                return [c for m in inner for c in _configs(m)]
        return [model.config]
    return [model_or_config]


def position_table(config, decoder: bool = False) -> int | None:
    """Positions the model's position table holds.

    Args:
        config: the model's config.
        decoder: the decoder's table (of a seq2seq model).

    Returns:
        The positions, or None when it has none (relative positions: T5, DeBERTa without absolute
        positions).
    """
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=decoder) or config
    if (
        getattr(config, "position_biased_input", True) is False
    ):  # DeBERTa-v2 with relative positions only
        return None
    n = getattr(config, "max_target_positions" if decoder else "max_source_positions", None)
    if n is None:
        n = getattr(config, "max_position_embeddings", None)
    if not isinstance(n, int) or n <= 0:
        return None
    if getattr(config, "model_type", None) in PADDING_OFFSET_TYPES:
        n -= (getattr(config, "pad_token_id", None) or 0) + 1
    return n


def tokenizer_limit(tokenizer) -> int | None:
    """The tokenizer's ``model_max_length`` when it is a real limit (not the 'unset' placeholder).

    Args:
        tokenizer: a tokenizer, or None.

    Returns:
        The limit, or None.
    """
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < _NO_TOKENIZER_LIMIT else None


def _smallest(values) -> int | None:
    values = [v for v in values if v is not None]
    return min(values) if values else None


def input_limit(model_or_config, tokenizer=None) -> int | None:
    """Tokens one input may hold, special tokens included, for every model given: the encoder's table
    for a seq2seq model, the table for an encoder or causal model, and the tokenizer's real
    ``model_max_length``.

    Args:
        model_or_config: a model, a wrapper, a config, a path or a list of them (every one counts).
        tokenizer: its tokenizer, or None.

    Returns:
        The smallest of those limits, or None when nothing limits it.

    Raises:
        LmkdError: a path whose config cannot be read.
    """
    return _smallest(
        [position_table(c) for c in _configs(model_or_config)] + [tokenizer_limit(tokenizer)]
    )


def target_limit(model_or_config) -> int | None:
    """Tokens one seq2seq label sequence may hold (the decoder's table: the decoder reads the start
    token and all labels but the last); for a causal model the same as :func:`input_limit`.

    Args:
        model_or_config: a model, a wrapper, a config, a path or a list of them (every one counts).

    Returns:
        The limit, or None when nothing limits it.

    Raises:
        LmkdError: a path whose config cannot be read.
    """
    return _smallest(
        [
            position_table(c, decoder=getattr(c, "is_encoder_decoder", False))
            for c in _configs(model_or_config)
        ]
    )


def fit_length(
    requested: int | None, model_or_config, tokenizer=None, what: str = "inputs"
) -> int | None:
    """The length to truncate to: the smaller of ``requested`` and what the model(s) take.

    Args:
        requested: the user's maximum (None: none).
        model_or_config: a model, a wrapper, a config, a path or a list of them (every one counts).
        tokenizer: its tokenizer, or None.
        what: ``"inputs"`` (:func:`input_limit`) or ``"targets"`` (:func:`target_limit`).

    Returns:
        The length, or None when neither limits it.

    Raises:
        LmkdError: a path whose config cannot be read.
        ValueError: ``what`` is neither ``"inputs"`` nor ``"targets"``.
    """
    if what not in ("inputs", "targets"):
        raise ValueError(f"what must be 'inputs' or 'targets', not {what!r}")
    limit = (
        input_limit(model_or_config, tokenizer)
        if what == "inputs"
        else target_limit(model_or_config)
    )
    return _smallest([requested, limit])


def generation_lengths(
    model_or_config, tokenizer=None, max_source_length: int | None = None, max_new_tokens: int = 128
) -> tuple[int | None, int]:
    """The input length and new tokens for generating with the model(s): the whole generated sequence
    must fit the table -- for a seq2seq model the start token and the new tokens fit the decoder's
    table (inputs fit the encoder's); for a causal model the prompt and the new tokens fit the one
    table (new tokens first, leaving at least one prompt token).

    Args:
        model_or_config: a model, a wrapper, a config, a path or a list of them (every one counts).
        tokenizer: its tokenizer, or None.
        max_source_length: the user's maximum input length (None: none).
        max_new_tokens: the new tokens asked for.

    Returns:
        ``(input length or None, new tokens)``.

    Raises:
        LmkdError: not one new token fits, or a path whose config cannot be read.
    """
    configs = _configs(model_or_config)
    seq2seq = any(getattr(c, "is_encoder_decoder", False) for c in configs)
    if seq2seq:
        dec = target_limit(configs)
        new = max_new_tokens if dec is None else min(max_new_tokens, dec - 1)
        src = fit_length(max_source_length, configs, tokenizer, "inputs")
    else:
        limit = input_limit(configs, tokenizer)
        new = max_new_tokens if limit is None else min(max_new_tokens, limit - 1)
        src = _smallest([max_source_length, None if limit is None else limit - new])
    if new < 1:
        raise LmkdError(
            f"the model's position table ({dec if seq2seq else limit} positions) leaves no room to "
            "generate a token"
        )
    return src, new


def truncation_note(
    what: str,
    rows: int,
    truncated: int,
    length: int | None,
    requested: int | None,
    positions: int | None,
) -> dict:
    """The record of one truncation (:func:`describe_truncation` words it).

    Args:
        what: ``inputs`` / ``targets`` / ``new tokens``.
        rows: the rows seen.
        truncated: how many of them were cut.
        length: the tokens they were cut to.
        requested: the user's maximum (None: none).
        positions: what the model takes (None: no limit).

    Returns:
        The record, a dict of those fields.
    """
    return {
        "what": what,
        "rows": rows,
        "truncated": truncated,
        "length": length,
        "requested": requested,
        "model_positions": positions,
    }


def describe_truncation(note: dict) -> str:
    """One line: 'N of M inputs truncated to L tokens (the model takes L positions)' -- or
    '(the maximum asked for)' when the user's maximum was the smaller.

    Args:
        note: a :func:`truncation_note` record.

    Returns:
        The line.
    """
    if note["what"] == "new tokens":
        if note["length"] == note["requested"]:
            return f"up to {note['length']} new tokens"
        return (
            f"max_new_tokens {note['requested']} lowered to {note['length']} (the model takes "
            f"{note['model_positions']} positions, the start token or prompt included)"
        )
    if note["length"] is None:
        return f"{note['rows']} {note['what']}, none truncated (no maximum and no position table)"
    by_model = note["model_positions"] is not None and (
        note["requested"] is None or note["length"] < note["requested"]
    )
    why = (
        f"the model takes {note['model_positions']} positions"
        if by_model
        else "the maximum asked for"
    )
    return f"{note['truncated']} of {note['rows']} {note['what']} truncated to {note['length']} tokens ({why})"


def encode_fitted(
    tokenizer,
    texts: list[str],
    length: int | None,
    target: bool = False,
    special_tokens: bool = True,
) -> tuple[dict, list[int]]:
    """``tokenizer(texts)`` truncated to ``length`` tokens.

    Args:
        tokenizer: the tokenizer.
        texts: the texts.
        length: the tokens to truncate to (None: not truncated).
        target: encode as ``text_target``.
        special_tokens: add the tokenizer's special tokens (False: texts that hold them
            already, e.g. a rendered chat template).

    Returns:
        ``(encoding, cut)``: the encoding as a dict of lists, and the indices of the texts that were cut.
    """
    texts = [str(t) for t in texts]
    call = (
        (lambda xs, **kw: tokenizer(text_target=xs, add_special_tokens=special_tokens, **kw))
        if target
        else (lambda xs, **kw: tokenizer(xs, add_special_tokens=special_tokens, **kw))
    )
    full = dict(call(texts, verbose=False))
    if length is None:
        return full, []
    long = [i for i, ids in enumerate(full["input_ids"]) if len(ids) > length]
    if long:
        cut = call([texts[i] for i in long], max_length=length, truncation=True)
        for key, values in full.items():
            for j, i in enumerate(long):
                values[i] = cut[key][j]
    return full, long
