"""Running a model over inputs for ``lmkd evaluate`` and on-policy KD.

``lmkd evaluate`` takes :func:`generate_texts` and :func:`classify` (outputs in input order),
:func:`generate_fixed_length` (the per-token speed) and :func:`output_lengths`; on-policy KD
(``lmkd.train.regimes.OnPolicyDistillationTrainer``) takes :func:`generate_seeded`.  ``lmkd generate``'s
K hypotheses per input are :mod:`lmkd.models.nbest`'s.  Every loop follows the rules of
:mod:`lmkd.models.loop_rules` (one EOS rule, one pad rule, one length-sorted batching); inputs (and
new tokens) are fitted to the model by :func:`lmkd.models.truncation.fit_length` /
:func:`lmkd.models.truncation.generation_lengths`, the one truncation rule of every command.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lmkd.core.errors import LmkdError
from lmkd.models.loading import unwrap
from lmkd.models.loop_rules import device_of, length_batches, longest_first
from lmkd.models.truncation import (
    encode_fitted,
    fit_length,
    generation_lengths,
    input_limit,
    target_limit,
    truncation_note,
)

# ---- lmkd evaluate: texts and class ids in input order -------------------------------------------


def _encode_inputs(
    model,
    tokenizer,
    texts: list[str],
    max_source_length: int | None,
    stats: dict | None,
    max_new_tokens: int | None = None,
):
    """Token lists of ``texts`` fitted to ``model`` by :mod:`lmkd.models.truncation`'s rule, and the number
    of new tokens that fit; records the truncation notes in ``stats`` (``inputs``, ``new tokens``)."""
    if max_new_tokens is None:
        length, new = fit_length(max_source_length, model, tokenizer, "inputs"), None
    else:
        length, new = generation_lengths(model, tokenizer, max_source_length, max_new_tokens)
    enc, cut = encode_fitted(tokenizer, texts, length)
    if stats is not None:
        stats["inputs"] = truncation_note(
            "inputs", len(texts), len(cut), length, max_source_length, input_limit(model, tokenizer)
        )
        if new is not None:
            lowered = len(texts) if new < max_new_tokens else 0
            stats["new tokens"] = truncation_note(
                "new tokens", len(texts), lowered, new, max_new_tokens, target_limit(model)
            )
    return enc, new


def _padded(tokenizer, enc: dict, idx: list[int], device):
    return tokenizer.pad([{k: enc[k][i] for k in enc} for i in idx], return_tensors="pt").to(device)


def generate_texts(
    model,
    tokenizer,
    sources: Sequence[str],
    num_beams: int = 4,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    max_source_length: int | None = 512,
    progress: bool = True,
    desc: str = "generating",
    stats: dict | None = None,
) -> list[str]:
    """Beam-search outputs of a seq2seq ``model`` for ``sources``, in the order of ``sources``.

    Inputs are truncated by :func:`lmkd.models.truncation.generation_lengths` (the smaller of
    ``max_source_length`` and the encoder's table; ``max_new_tokens`` lowered to what the
    decoder's table holds), batched by token length (longest first) and the outputs put back in
    order; a tqdm bar counts examples.  The model's own generation config applies apart from
    ``num_beams`` and ``max_new_tokens``.

    Args:
        model: a seq2seq model (or an engine that generates like one).
        tokenizer: its tokenizer.
        sources: the input texts.
        num_beams: the beam size.
        max_new_tokens: the most new tokens per output.
        batch_size: inputs per batch.
        max_source_length: the user's maximum input length (None: the model's).
        progress: show the tqdm bar.
        desc: the bar's label.
        stats: when given, receives the truncation notes (``inputs``, ``new tokens``:
            :func:`lmkd.models.truncation.truncation_note`).

    Returns:
        The output texts, stripped.

    Raises:
        LmkdError: not a sequence-to-sequence model, or no new token fits its position table.
    """
    from tqdm.auto import tqdm

    if not getattr(model.config, "is_encoder_decoder", False):
        raise LmkdError(
            f"{type(model).__name__} is not a sequence-to-sequence model; translation and "
            "summarization evaluation need one (T5, BART, Marian, ...)"
        )
    sources = [str(s) for s in sources]
    outputs: list[str | None] = [None] * len(sources)
    device = device_of(model)
    model.eval()
    enc, new = _encode_inputs(model, tokenizer, sources, max_source_length, stats, max_new_tokens)
    lengths = [len(ids) for ids in enc["input_ids"]]
    with (
        tqdm(total=len(sources), desc=desc, unit="ex", disable=not progress) as bar,
        torch.inference_mode(),
    ):
        for idx in length_batches(longest_first(lengths), lengths, batch_size):
            out = model.generate(
                **_padded(tokenizer, enc, idx, device),
                num_beams=num_beams,
                max_new_tokens=new,
                do_sample=False,
            )
            for i, text in zip(idx, tokenizer.batch_decode(out, skip_special_tokens=True)):
                outputs[i] = text.strip()
            bar.update(len(idx))
    return outputs  # type: ignore[return-value]


def generate_fixed_length(
    model, tokenizer, source: str, new_tokens: int, max_source_length: int | None = 512
) -> int:
    """Greedy decoding of exactly ``new_tokens`` tokens for one source at batch 1 (EOS is held off
    until then: ``min_new_tokens == max_new_tokens``); fewer when the decoder's position table holds
    fewer (:func:`lmkd.models.truncation.generation_lengths`).

    What :func:`lmkd.scoring.timing.measure_speed` times for the per-token speed of an architecture:
    every model decodes the same number of tokens, whatever it would have said, so a model that
    writes longer outputs is not counted as slower per token.

    Args:
        model: a seq2seq model (or an engine that generates like one).
        tokenizer: its tokenizer.
        source: the input text.
        new_tokens: the tokens to decode.
        max_source_length: the user's maximum input length (None: the model's).

    Returns:
        The number of tokens generated.

    Raises:
        LmkdError: not a sequence-to-sequence model, or ``new_tokens`` below 1.
    """
    if not getattr(model.config, "is_encoder_decoder", False):
        raise LmkdError(
            f"{type(model).__name__} is not a sequence-to-sequence model; fixed-length decoding "
            "needs one"
        )
    if new_tokens < 1:
        raise LmkdError(f"fixed-length decoding needs at least 1 new token, got {new_tokens}")
    # the one truncation rule: the source fitted to the encoder's table, the length to the decoder's
    enc, new = _encode_inputs(model, tokenizer, [str(source)], max_source_length, None, new_tokens)
    with torch.inference_mode():
        out = model.generate(
            **_padded(tokenizer, enc, [0], device_of(model)),
            num_beams=1,
            do_sample=False,
            min_new_tokens=new,
            max_new_tokens=new,
        )
    return int(out.shape[1]) - 1  # the decoder start token is not generated


def output_lengths(tokenizer, texts: Sequence[str]) -> list[int]:
    """Tokens of each output text under ``tokenizer`` (no special tokens): how long a model's
    outputs are, in the unit its decoder pays for.

    Args:
        tokenizer: the model's tokenizer.
        texts: the output texts.

    Returns:
        One count per text.
    """
    if not texts:
        return []
    return [
        len(ids)
        for ids in tokenizer([str(t) for t in texts], add_special_tokens=False)["input_ids"]
    ]


def classify(
    model,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 32,
    max_source_length: int | None = 512,
    progress: bool = True,
    desc: str = "classifying",
    stats: dict | None = None,
) -> list[int]:
    """Predicted class ids (argmax of the logits) of a sequence classifier, in input order.

    Args:
        model: the classifier (or an engine called like one).
        tokenizer: its tokenizer.
        texts: the input texts.
        batch_size: inputs per batch.
        max_source_length: the user's maximum input length; inputs are truncated to
            :func:`lmkd.models.truncation.fit_length`.
        progress: show a tqdm bar.
        desc: the bar's label.
        stats: as in :func:`generate_texts`.

    Returns:
        One class id per text.
    """
    from tqdm.auto import tqdm

    texts = [str(t) for t in texts]
    preds: list[int] = [0] * len(texts)
    device = device_of(model)
    model.eval()
    enc, _ = _encode_inputs(model, tokenizer, texts, max_source_length, stats)
    lengths = [len(ids) for ids in enc["input_ids"]]
    with (
        tqdm(total=len(texts), desc=desc, unit="ex", disable=not progress) as bar,
        torch.inference_mode(),
    ):
        for idx in length_batches(longest_first(lengths), lengths, batch_size):
            logits = model(**_padded(tokenizer, enc, idx, device)).logits
            for i, p in zip(idx, logits.argmax(-1).tolist()):
                preds[i] = int(p)
            bar.update(len(idx))
    return preds


# ---- on-policy KD: the student's samples ---------------------------------------------------------


@torch.no_grad()
def generate_seeded(model, seed: int, **generate_kwargs) -> torch.Tensor:
    """``model.generate(**generate_kwargs)`` in eval mode with the RNG seeded by ``seed``; the global
    RNG state and the model's train/eval mode are restored afterwards.

    Args:
        model: the model.
        seed: the seed.
        **generate_kwargs: passed to ``generate``.

    Returns:
        What ``generate`` returns.
    """
    model = unwrap(model)
    device = device_of(model)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return model.generate(**generate_kwargs)
    finally:
        model.train(was_training)
