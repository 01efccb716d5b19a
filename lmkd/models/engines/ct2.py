"""The ``ct2-*`` formats read back: a CTranslate2 ``Translator`` (:class:`CT2Seq2Seq`) or
``Generator`` (:class:`CT2Causal`) behind the calls lmkd makes of an HF model.  Decoding runs in
CTranslate2's own C++ loop; a causal LM's perplexity comes from its ``score_batch``
(:meth:`CT2Causal.token_log_probs`)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

from lmkd.core.errors import LmkdError
from lmkd.models.engines.base import Engine, hf_config
from lmkd.models.engines.formats import HF_DIR


def _open_ct2(cls, path: str, device: torch.device):
    """A CTranslate2 ``Translator`` / ``Generator`` of ``path`` on ``device``, with the threads PyTorch gets."""
    threads = torch.get_num_threads()  # the same threads PyTorch gets: a fair comparison
    try:
        return cls(
            path,
            device=device.type if device.type == "cuda" else "cpu",
            device_index=device.index or 0,
            intra_threads=threads,
            inter_threads=1,
        )
    except (RuntimeError, ValueError) as e:
        raise LmkdError(f"CTranslate2 cannot load {path}: {str(e).splitlines()[0]}") from e


def _generation_config(path: str):
    from transformers import GenerationConfig

    hf = os.path.join(path, HF_DIR)
    return (
        GenerationConfig.from_pretrained(hf)
        if os.path.isfile(os.path.join(hf, "generation_config.json"))
        else GenerationConfig()
    )


class _CT2Engine(Engine):
    """What both CTranslate2 engines share: the HF config and generation config an lmkd export
    carries (or a stand-in for a plain CTranslate2 directory), the tokenizer, and the CTranslate2
    object (``CT2_CLASS``: ``Translator`` / ``Generator``) made on first use."""

    CT2_CLASS = ""

    def __init__(self, path: str, tokenizer, device: torch.device):
        config = hf_config(path)
        if config is None:  # a CTranslate2 directory not written by lmkd
            config = self._plain_config(tokenizer)
        super().__init__(config, torch.device("cpu") if device.type != "cuda" else device)
        self.tokenizer = tokenizer
        self.path, self.device_spec = str(path), device
        self._engine = self._open()  # a model that cannot be loaded says so now
        self.generation_config = _generation_config(path)

    def _plain_config(self, tokenizer) -> SimpleNamespace:
        raise NotImplementedError

    def _open(self):
        import ctranslate2

        return _open_ct2(getattr(ctranslate2, self.CT2_CLASS), self.path, self.device_spec)

    @staticmethod
    def _rows(input_ids, attention_mask) -> list[torch.Tensor]:
        """Per row, the positions of its real tokens."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return [m.bool().nonzero().flatten() for m in attention_mask.cpu()]

    def _tokens(self, ids: torch.Tensor, rows: list[torch.Tensor]) -> list[list[str]]:
        """The token strings of each row's real tokens (what CTranslate2 takes)."""
        return [
            self.tokenizer.convert_ids_to_tokens(ids[i, idx].tolist()) for i, idx in enumerate(rows)
        ]

    def _decoding_options(self) -> dict:
        """The model's own generation config as CTranslate2's decoding options (as HF applies it)."""
        gc = self.generation_config
        return dict(
            length_penalty=gc.length_penalty if gc.length_penalty is not None else 1.0,
            no_repeat_ngram_size=gc.no_repeat_ngram_size or 0,
            repetition_penalty=gc.repetition_penalty or 1.0,
            max_batch_size=0,
        )


def _padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    """``rows`` of token ids padded on the right with ``pad`` into one ``[len(rows), longest]`` tensor."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long).reshape(
        len(rows), width
    )


class CT2Seq2Seq(_CT2Engine):
    """A CTranslate2 ``Translator`` behind HF's ``generate(input_ids, attention_mask, ...)``: the
    same token ids in, the same ``[decoder start] + tokens`` out, so lmkd's generation loops, their
    truncation rule and the fixed-length speed runner work unchanged.  The model's own generation
    config (length penalty, no-repeat n-grams, repetition penalty) applies, as it does in HF.

    The translator is opened at once, so an export that cannot be loaded says so here.

    Args:
        path: the export (or plain CTranslate2) directory.
        tokenizer: the model's tokenizer (token ids to the token strings CTranslate2 takes, and back).
        device: where it runs (``cuda`` on a GPU, else CPU), with the threads PyTorch gets.

    Raises:
        LmkdError: CTranslate2 cannot load ``path``.
    """

    CT2_CLASS = "Translator"

    def _plain_config(self, tokenizer) -> SimpleNamespace:
        return SimpleNamespace(
            is_encoder_decoder=True, model_type="ctranslate2", decoder_start_token_id=None
        )

    @property
    def translator(self):
        """The ``ctranslate2.Translator`` (made again after :meth:`close`)."""
        return self.engine

    def generate(
        self,
        input_ids,
        attention_mask=None,
        num_beams: int = 1,
        max_new_tokens: int = 128,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        **_,
    ) -> torch.Tensor:
        """Decode a batch as HF's ``generate`` would (greedy or beam search; ``do_sample`` is ignored).

        Where the generation config forces an EOS, one fewer token is decoded and the EOS added, as
        HF makes the last of ``max_new_tokens`` an EOS (not when ``min_new_tokens == max_new_tokens``).

        Args:
            input_ids: ``[batch, length]`` source token ids.
            attention_mask: 1 at the real tokens (all real when None).
            num_beams: the beam size.
            max_new_tokens: the most tokens decoded per row.
            min_new_tokens: the fewest tokens decoded per row.
            do_sample: accepted for HF's signature and ignored.

        Returns:
            ``[batch, longest]`` token ids on CPU: the decoder start, the tokens, padded on the right
            with the tokenizer's pad id.
        """
        ids = input_ids.cpu()
        sources = self._tokens(ids, self._rows(ids, attention_mask))
        gc = self.generation_config
        # HF's forced_eos_token_id makes the last of max_new_tokens an EOS: decode one fewer and add it
        # (not when the length is fixed -- min_new_tokens == max_new_tokens -- where HF decodes them all)
        forced_eos = gc.forced_eos_token_id is not None and min_new_tokens < max_new_tokens
        limit = max_new_tokens - 1 if forced_eos else max_new_tokens
        results = self.translator.translate_batch(
            sources,
            beam_size=num_beams,
            max_decoding_length=limit,
            min_decoding_length=min_new_tokens,
            **self._decoding_options(),
        )
        start = getattr(self.config, "decoder_start_token_id", None)
        start = self.tokenizer.pad_token_id if start is None else start
        rows = [[start] + self.tokenizer.convert_tokens_to_ids(r.hypotheses[0]) for r in results]
        if forced_eos:
            eos = gc.forced_eos_token_id
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
            rows = [r + [eos] if len(r) == limit + 1 else r for r in rows]
        return _padded(rows, self.tokenizer.pad_token_id or 0)


class CT2Causal(_CT2Engine):
    """A CTranslate2 ``Generator`` of a causal LM, called like the HF model:

    * :meth:`token_log_probs` -- ``log p(token t | tokens < t)`` of every real token after the first
      (``score_batch`` on exactly the given tokens: nothing prepended, the first token not scored, as
      :mod:`lmkd.evaluate.fidelity` scores a PyTorch causal LM), which ``lmkd evaluate`` turns into perplexity;
    * ``forward(input_ids, attention_mask)`` -- ``.logits`` from ``forward_batch`` (what the speed
      runner of ``--task causal-lm`` times, as it times a PyTorch model's forward pass);
    * ``generate(input_ids, attention_mask, max_new_tokens, min_new_tokens, num_beams)`` -- the
      input ids (as given, padding included) followed by the new ids, EOS kept and the rows padded
      after it, as HF's ``generate`` returns them.

    The model's own generation config (EOS ids, pad id, repetition penalty, no-repeat n-grams, length
    penalty) applies, as it does in HF.

    The generator is opened at once, so an export that cannot be loaded says so here.

    Args:
        path: the export (or plain CTranslate2) directory.
        tokenizer: the model's tokenizer (token ids to the token strings CTranslate2 takes).
        device: where it runs (``cuda`` on a GPU, else CPU), with the threads PyTorch gets.

    Raises:
        LmkdError: CTranslate2 cannot load ``path``.
    """

    CT2_CLASS = "Generator"

    def _plain_config(self, tokenizer) -> SimpleNamespace:
        return SimpleNamespace(
            is_encoder_decoder=False,
            model_type="ctranslate2",
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    @property
    def generator(self):
        """The ``ctranslate2.Generator`` (made again after :meth:`close`)."""
        return self.engine

    def token_log_probs(self, input_ids, attention_mask=None) -> torch.Tensor:
        """``[batch, length - 1]``: at ``t - 1``, the log-probability of the token at ``t`` given the
        real tokens before it (the causal alignment of :mod:`lmkd.data.positions`); 0 where ``t`` is padding
        or a row's first real token.

        Args:
            input_ids: ``[batch, length]`` token ids.
            attention_mask: 1 at the real tokens (all real when None).

        Returns:
            ``[batch, length - 1]`` float32 log-probabilities on CPU.
        """
        ids = input_ids.cpu()
        rows = self._rows(ids, attention_mask)
        out = torch.zeros(ids.shape[0], max(ids.shape[1] - 1, 0), dtype=torch.float32)
        scored = [i for i, idx in enumerate(rows) if len(idx) >= 2]
        if scored:
            tokens = self._tokens(ids, rows)
            results = self.generator.score_batch(
                [tokens[i] for i in scored], max_batch_size=0, max_input_length=0
            )
            for i, r in zip(scored, results):
                out[i, rows[i][1:] - 1] = torch.tensor(r.log_probs, dtype=torch.float32)
        return out

    def forward(self, input_ids, attention_mask=None, **_) -> SimpleNamespace:
        """The logits of a batch from ``forward_batch`` (what the speed runner times as a forward pass).

        Args:
            input_ids: ``[batch, length]`` token ids.
            attention_mask: 1 at the real tokens (all real when None).

        Returns:
            A namespace with ``.logits`` ``[batch, length, vocabulary]`` at the real tokens' positions
            (0 at padding), on :attr:`device`.
        """
        import numpy as np

        ids = input_ids.cpu()
        rows = self._rows(ids, attention_mask)
        view = self.generator.forward_batch([ids[i, idx].tolist() for i, idx in enumerate(rows)])
        device = self.device
        # CTranslate2's memory, shared (CPU: numpy's array interface; GPU: __cuda_array_interface__): copied
        # once below, into a tensor of the input's layout -- the speed runner times this as a forward pass
        logits = (
            torch.as_tensor(view, device=device)
            if device.type == "cuda"
            else torch.from_numpy(np.asarray(view))
        )
        right_padded = all(len(idx) == 0 or int(idx[-1]) == len(idx) - 1 for idx in rows)
        if right_padded and logits.shape[1] == ids.shape[1]:
            out = logits.clone()
            for i, idx in enumerate(rows):
                out[i, len(idx) :] = 0
        else:
            out = torch.zeros(*ids.shape, logits.shape[-1], dtype=logits.dtype, device=device)
            for i, idx in enumerate(rows):
                out[i, idx.to(device)] = logits[i, : len(idx)]
        return SimpleNamespace(logits=out)

    def _eos_ids(self) -> list[int]:
        eos = self.generation_config.eos_token_id
        if eos is None:
            eos = getattr(self.config, "eos_token_id", None)
        return [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]

    def generate(
        self,
        input_ids,
        attention_mask=None,
        num_beams: int = 1,
        max_new_tokens: int = 128,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        **_,
    ) -> torch.Tensor:
        """Continue each prompt as HF's ``generate`` does (greedy or beam search).

        The prompt is forwarded at once and not decoded again: ``max_new_tokens`` and
        ``min_new_tokens`` count the new tokens only.

        Args:
            input_ids: ``[batch, length]`` prompt ids (padding included).
            attention_mask: 1 at the real tokens (all real when None).
            num_beams: the beam size.
            max_new_tokens: the most new tokens per row.
            min_new_tokens: the fewest new tokens per row.
            do_sample: must be False.

        Returns:
            ``[batch, length + longest]`` ids on CPU: ``input_ids`` as given, then the new ids, EOS kept,
            padded after it with the generation config's pad id (else the EOS, else the tokenizer's).

        Raises:
            LmkdError: ``do_sample`` is True (this engine does not sample).
        """
        if do_sample:
            raise LmkdError(
                "a CTranslate2 causal LM export decodes greedily or by beam search here, not by sampling"
            )
        ids = input_ids.cpu()
        rows = self._rows(ids, attention_mask)
        prompts = self._tokens(ids, rows)
        gc, eos = self.generation_config, self._eos_ids()
        # the prompt is forwarded at once and not returned: max/min_length count the new tokens only
        results = self.generator.generate_batch(
            prompts,
            max_length=max_new_tokens,
            min_length=min_new_tokens,
            beam_size=num_beams,
            include_prompt_in_result=False,
            end_token=eos or None,
            return_end_token=True,
            **self._decoding_options(),
        )
        pad = (
            gc.pad_token_id
            if gc.pad_token_id is not None
            else eos[0]
            if eos
            else (self.tokenizer.pad_token_id or 0)
        )
        return torch.cat([ids, _padded([r.sequences_ids[0] for r in results], pad)], dim=1)
