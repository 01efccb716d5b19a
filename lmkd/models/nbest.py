"""``lmkd generate``'s decoding: K hypotheses per input and their teacher scores.

:func:`generate_batch` (driven by :mod:`lmkd.teacher.pseudo_targets`) decodes one batch with the
:class:`DecodingSettings` of the command (beam search, or sampling by :class:`PerExampleSampler`, whose
draws do not depend on the batch) and scores every hypothesis by :func:`sequence_scores`; EOS, padding
and batching follow :mod:`lmkd.models.loop_rules`.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import torch

from lmkd.core.constants import CAUSAL, SEQ2SEQ
from lmkd.models.loading import model_kind, unwrap
from lmkd.models.loop_rules import (
    device_of,
    eos_setting,
    eos_token_ids,
    pad_batch,
    pad_token_id,
    trim_at_eos,
)


class DecodingSettings(Protocol):
    """The decoding fields :func:`generate_batch` reads (``lmkd.teacher.pseudo_target_files.GenerationSettings``
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
        eos_token_id=eos_setting(model),
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
    device = device_of(model)
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
    device = device_of(model)
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
