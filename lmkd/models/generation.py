"""Running a model over inputs: generation, classification, and the rules every loop shares.

The three commands that run models over many inputs -- ``lmkd evaluate`` (:func:`generate_texts`,
:func:`classify`), ``lmkd generate`` (:func:`generate_batch`, driven by :mod:`lmkd.teacher.pseudo_targets`) and
on-policy KD (:func:`generate_seeded`, :func:`eos_mask`, used by
``lmkd.train.regimes.OnPolicyDistillationTrainer``) -- take these from here:

* **EOS**: :func:`eos_token_ids` -- the ids of the model's generation config, else of its config
  (one id or a list); a generated sequence counts up to and including its first EOS
  (:func:`trim_at_eos` for token lists, :func:`eos_mask` for tensors);
* **padding**: :func:`pad_token_id` -- the tokenizer's pad (else its EOS) when the inputs were
  tokenised by it, else the model's pad id, its lowest EOS id, or 0;
* **batching**: :func:`longest_first` orders inputs by length and :func:`length_batches` cuts that
  order into batches of ``batch_size`` rows and/or at most ``max_tokens`` padded tokens, so a batch
  holds inputs of similar length (little padding) and the largest batch comes first (an early OOM);
* **sampling that does not depend on the batch**: :class:`PerExampleSampler`;
* **lengths**: inputs (and new tokens) fitted to the model by :func:`lmkd.models.truncation.fit_length` /
  :func:`lmkd.models.truncation.generation_lengths`, the one truncation rule of every command.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Protocol

import torch

from lmkd.core.constants import CAUSAL, SEQ2SEQ
from lmkd.core.errors import LmkdError
from lmkd.models.loading import model_kind, unwrap
from lmkd.models.truncation import (
    encode_fitted,
    fit_length,
    generation_lengths,
    input_limit,
    target_limit,
    truncation_note,
)

# ---- the shared rules: EOS, padding, batching --------------------------------------------------


def _eos_setting(model) -> int | list[int] | None:
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
    eos = _eos_setting(model)
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


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


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
    device = _device_of(model)
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

    What :func:`lmkd.scoring.metrics.measure_speed` times for the per-token speed of an architecture:
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
            **_padded(tokenizer, enc, [0], _device_of(model)),
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
    device = _device_of(model)
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
    device = _device_of(model)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return model.generate(**generate_kwargs)
    finally:
        model.train(was_training)


# ---- lmkd generate: K hypotheses per input and their teacher scores ------------------------------


class DecodingSettings(Protocol):
    """The decoding fields :func:`generate_batch` reads (``lmkd.teacher.pseudo_targets.GenerationSettings``
    has them).

    Attributes:
        num_beams: the beam size.
        num_return_sequences: hypotheses per input (K).
        max_new_tokens: the most new tokens.
        do_sample: sample (:class:`PerExampleSampler`) instead of searching.
        temperature: the sampling temperature.
        top_k: keep the k most likely tokens when sampling (None: all).
        top_p: nucleus sampling's mass (None: all).
        seed: the sampler's seed.
        length_penalty: the beam search's length penalty.
        no_repeat_ngram_size: n-grams that may not repeat (0: any may).
        repetition_penalty: the repetition penalty.
    """

    num_beams: int
    num_return_sequences: int
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    length_penalty: float
    no_repeat_ngram_size: int
    repetition_penalty: float


def _row_seed(seed: int, index: int, sample: int, step: int) -> int:
    digest = hashlib.sha256(f"{seed}/{index}/{sample}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class PerExampleSampler:
    """A logits processor that turns greedy search into sampling (Gumbel-max): to the warped
    log-probabilities it adds Gumbel noise drawn from a generator seeded by (seed, example index,
    sample number, step).  The draw of an example therefore does not depend on which other
    examples share its batch, on the batch size, on the process, or on a resumed run.

    Args:
        seed: the seed.
        keys: per row of the batch, ``(example index, sample number)``.
        temperature: the sampling temperature.
        top_k: keep the k most likely tokens (None: all).
        top_p: nucleus sampling's mass (None: all).
    """

    def __init__(
        self,
        seed: int,
        keys: list[tuple[int, int]],
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ):
        from transformers import TopKLogitsWarper, TopPLogitsWarper

        self.seed, self.keys, self.temperature = seed, keys, temperature
        self.warpers = ([TopKLogitsWarper(top_k)] if top_k else []) + (
            [TopPLogitsWarper(top_p)] if top_p else []
        )
        self.step = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        noise = torch.empty_like(scores, device="cpu")
        for row, (index, sample) in enumerate(self.keys):
            g = torch.Generator().manual_seed(_row_seed(self.seed, index, sample, self.step))
            u = torch.rand(scores.shape[-1], generator=g, dtype=torch.float64).clamp_(
                1e-20, 1 - 1e-16
            )
            noise[row] = (-torch.log(-torch.log(u))).float()
        self.step += 1
        return scores + noise.to(scores.device)


def generation_config(model, s: DecodingSettings, pad_id: int):
    """The ``GenerationConfig`` of ``s`` for ``model``: its own special ids (EOS by
    :func:`eos_token_ids`) and early stopping; sampling is done by :class:`PerExampleSampler`.

    Args:
        model: the model.
        s: the decoding settings.
        pad_id: the padding id.

    Returns:
        The ``GenerationConfig``.
    """
    from transformers import GenerationConfig

    model = unwrap(model)
    own = model.generation_config
    kwargs = dict(
        max_new_tokens=s.max_new_tokens,
        num_beams=s.num_beams,
        do_sample=False,
        num_return_sequences=1 if s.do_sample else s.num_return_sequences,
        length_penalty=s.length_penalty,
        no_repeat_ngram_size=s.no_repeat_ngram_size,
        repetition_penalty=s.repetition_penalty,
        pad_token_id=pad_id,
        eos_token_id=_eos_setting(model),
        bos_token_id=own.bos_token_id,
        decoder_start_token_id=own.decoder_start_token_id,
        forced_bos_token_id=own.forced_bos_token_id,
        forced_eos_token_id=own.forced_eos_token_id,
        early_stopping=own.early_stopping if s.num_beams > 1 else False,
    )
    if (
        getattr(model.config, "is_encoder_decoder", False)
        and kwargs["decoder_start_token_id"] is None
    ):
        kwargs["decoder_start_token_id"] = model.config.decoder_start_token_id
    return GenerationConfig(**kwargs)


@torch.no_grad()
def sequence_scores(
    model,
    kind: str,
    prompts: list[list[int]],
    hyps: list[list[int]],
    pad_id: int,
    start_id: int | None,
    max_elements: int = 2**25,
) -> list[float]:
    """Mean log-probability per token of each hypothesis given its prompt (teacher forcing), in
    sub-batches whose logits stay under ``max_elements``.

    Args:
        model: the model.
        kind: its kind (``seq2seq`` or ``causal``).
        prompts: the prompt ids, one per hypothesis.
        hyps: the hypothesis ids.
        pad_id: the padding id.
        start_id: the decoder start id (seq2seq).
        max_elements: the most logits per sub-batch.

    Returns:
        One score per hypothesis.
    """
    device = _device_of(model)
    vocab = unwrap(model).config.get_text_config().vocab_size
    out: list[float] = []

    def width(t: int) -> int:  # logits positions of row t
        return len(prompts[t]) + len(hyps[t]) if kind == CAUSAL else len(hyps[t]) + 1

    i = 0
    while i < len(hyps):
        j, widest = i + 1, width(i)
        while j < len(hyps) and (j + 1 - i) * max(widest, width(j)) * vocab <= max_elements:
            widest = max(widest, width(j))
            j += 1
        P, H = prompts[i:j], [h if h else [pad_id] for h in hyps[i:j]]
        lengths = [max(len(h), 1) for h in hyps[i:j]]
        if kind == SEQ2SEQ:
            ids, mask = pad_batch(P, pad_id, False, device)
            dec_in, _ = pad_batch([[start_id] + h[:-1] for h in H], pad_id, False, device)
            target, tmask = pad_batch(H, pad_id, False, device)
            logits = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_in).logits
        else:
            seqs = [p + h for p, h in zip(P, H)]
            ids, mask = pad_batch(seqs, pad_id, True, device)
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            hl = max(len(h) for h in H)
            logits = logits[:, -hl - 1 : -1]
            target, tmask = pad_batch(H, pad_id, True, device)
        lp = torch.log_softmax(logits.float(), -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        sums = (lp * tmask).sum(-1)
        out.extend(float(s) / n for s, n in zip(sums.tolist(), lengths))
        i = j
    return out


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    inputs: list[list[int]],
    indices: list[int],
    s: DecodingSettings,
    kind: str | None = None,
) -> list[dict]:
    """Generate for one batch of tokenised inputs.

    Args:
        model: the model.
        tokenizer: its tokenizer.
        inputs: the input ids.
        indices: their row numbers, which seed the sampler.
        s: the decoding settings.
        kind: the model's kind (:func:`lmkd.models.loading.model_kind` when None).

    Returns:
        Per input ``{"teacher_nbest": [...], "teacher_nbest_scores": [...]}``: K hypotheses (best first
        for beam search) and their :func:`sequence_scores`.
    """
    kind = kind or model_kind(model)
    device = _device_of(model)
    pad_id = pad_token_id(model, tokenizer)
    gc = generation_config(model, s, pad_id)
    k = s.num_return_sequences
    processors = None
    rows = inputs
    if s.do_sample:
        from transformers import LogitsProcessorList

        rows = [x for x in inputs for _ in range(k)]
        keys = [(idx, j) for idx in indices for j in range(k)]
        processors = LogitsProcessorList(
            [PerExampleSampler(s.seed, keys, s.temperature, s.top_k, s.top_p)]
        )
    ids, mask = pad_batch(rows, pad_id, left=(kind == CAUSAL), device=device)
    seq = model.generate(
        input_ids=ids, attention_mask=mask, generation_config=gc, logits_processor=processors
    )
    new = seq[:, ids.shape[1] :] if kind == CAUSAL else seq[:, 1:]
    eos = eos_token_ids(model)
    hyps = [trim_at_eos(t, eos, pad_id) for t in new.tolist()]
    prompts = [x for x in inputs for _ in range(k)]
    scores = sequence_scores(model, kind, prompts, hyps, pad_id, gc.decoder_start_token_id)
    texts = tokenizer.batch_decode(hyps, skip_special_tokens=True)
    return [
        {
            "teacher_nbest": [t.strip() for t in texts[i * k : (i + 1) * k]],
            "teacher_nbest_scores": scores[i * k : (i + 1) * k],
        }
        for i in range(len(inputs))
    ]
