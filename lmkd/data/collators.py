"""The collator of each task (:func:`collator_for`): dynamic padding, labels padded with
``IGNORE_INDEX``, and MLM masks keyed by seed and batch (:class:`KeyedMasking`), so a resumed run masks
each batch as an uninterrupted one does.
"""

from __future__ import annotations

from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
)

from lmkd.core.constants import CAUSAL, CLASSIFICATION, IGNORE_INDEX, MLM, SEQ2SEQ, TASK_KIND
from lmkd.data.tokenizing import PROMPT_LENGTH


class KeyedMasking(DataCollatorForLanguageModeling):
    """BERT's masking, with each batch's masks drawn from a generator seeded by ``seed`` and the
    batch's tokens, not from one stream.

    A stream cannot be resumed exactly: the Trainer's data loader collates one batch ahead, so a
    checkpoint's saved random state (global, or the collator's own) has already drawn the next
    batch's masks, and a resumed run masked that batch differently from an uninterrupted one.
    Keyed by content, the same batch gets the same masks in both; shuffled epochs make other
    batches, so masks still change between epochs.

    Args:
        tokenizer: the model's tokenizer.
        mlm: True (masked language modelling).
        mlm_probability: the share of tokens masked.
        seed: the run's seed; with the batch's tokens it keys each batch's masks.
    """

    def torch_mask_tokens(self, inputs, special_tokens_mask=None, offset_mapping=None):
        """BERT's masking of ``inputs``, from a generator seeded by the seed, the batch's shape
        and its tokens.

        Args:
            inputs: ``(B, T)`` token ids.
            special_tokens_mask: positions never to mask (None: the tokenizer's special tokens).
            offset_mapping: passed on to the parent's masking.

        Returns:
            ``(inputs, labels)`` as :class:`DataCollatorForLanguageModeling` returns them.
        """
        import hashlib

        import torch

        digest = hashlib.sha256(
            f"lmkd-mlm:{self.seed}:{tuple(inputs.shape)}:".encode()
            + inputs.to(torch.int64).numpy().tobytes()
        ).digest()
        self.generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        return super().torch_mask_tokens(
            inputs, special_tokens_mask=special_tokens_mask, offset_mapping=offset_mapping
        )


def collator_for(
    task: str, tokenizer, model=None, mlm_probability: float = 0.15, seed: int | None = None
):
    """The HF collator for a task (dynamic padding; labels padded with IGNORE_INDEX, -100).

    MLM with a ``seed``: masks drawn per batch from the seed and the batch's tokens
    (:class:`KeyedMasking`), so a resumed run masks each batch as an uninterrupted one does.  A
    causal or MLM tokenizer without a pad token gets its EOS token as one.

    Args:
        task: the task name (a key of :data:`lmkd.core.constants.TASK_KIND`).
        tokenizer: the model's tokenizer.
        model: the seq2seq model (its ``prepare_decoder_input_ids_from_labels``); other kinds
            ignore it.
        mlm_probability: the share of tokens masked (MLM).
        seed: keys MLM masks per batch (None: one random stream).

    Returns:
        A ``DataCollatorForSeq2Seq``, ``DataCollatorWithPadding``, :class:`KeyedMasking` or
        ``DataCollatorForLanguageModeling``.
    """
    kind = TASK_KIND[task]
    if kind == SEQ2SEQ:
        return DataCollatorForSeq2Seq(
            tokenizer, model=model, label_pad_token_id=IGNORE_INDEX, padding=True
        )
    if kind == CLASSIFICATION:
        return DataCollatorWithPadding(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if kind == MLM and seed is not None:
        return KeyedMasking(tokenizer, mlm=True, mlm_probability=mlm_probability, seed=seed)
    plain = DataCollatorForLanguageModeling(
        tokenizer, mlm=(kind == MLM), mlm_probability=mlm_probability, seed=seed
    )
    return CausalCollator(tokenizer, plain) if kind == CAUSAL else plain


class CausalCollator:
    """A causal LM's collator: rows with their own ``labels`` (chat and prompt/completion rows,
    :mod:`lmkd.data.chat`, whose labels mask every token but the assistant's) are padded as they
    are -- labels with ``IGNORE_INDEX``, on the tokenizer's padding side; rows without are given
    ``plain``'s labels (every real token).  Each row's :data:`PROMPT_LENGTH` is dropped (the
    on-policy regime's collator takes it off before this one).

    Args:
        tokenizer: the model's tokenizer (its pad token and padding side).
        plain: the collator of rows without labels (``DataCollatorForLanguageModeling``).
    """

    def __init__(self, tokenizer, plain):
        self.tokenizer, self.plain = tokenizer, plain

    def __call__(self, features: list[dict]) -> dict:
        """Collate ``features``.

        Args:
            features: the rows (``input_ids``, ``attention_mask``, optionally ``labels``).

        Returns:
            The padded batch, as tensors.
        """
        import torch

        features = [{k: v for k, v in f.items() if k != PROMPT_LENGTH} for f in features]
        if "labels" not in features[0]:
            return self.plain(features)
        labels = [list(f.pop("labels")) for f in features]
        batch = self.tokenizer.pad(features, return_tensors="pt")
        width = batch["input_ids"].shape[1]
        out = torch.full((len(labels), width), IGNORE_INDEX, dtype=torch.long)
        left = self.tokenizer.padding_side == "left"
        for i, row in enumerate(labels):
            if row and left:
                out[i, width - len(row) :] = torch.tensor(row)
            elif row:
                out[i, : len(row)] = torch.tensor(row)
        batch["labels"] = out
        return batch
