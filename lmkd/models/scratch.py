"""Models and tokenizers from scratch: for the study (no teacher given), the demo and the tests.

With no network there is no pretrained checkpoint, so lmkd trains a tokenizer on the user's data
(``tokenizers``) and builds a model from a config.  One function per concern, one table of
architectures -- the same ones make_student knows.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    BartConfig,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    MarianConfig,
    MBartConfig,
    PreTrainedTokenizerFast,
    T5Config,
)

from lmkd.core.constants import CAUSAL, MLM, SEQ2SEQ
from lmkd.models.loading import AUTO_CLASS

SPECIAL_TOKENS = ["<pad>", "</s>", "<s>", "<unk>", "<mask>"]
PAD, EOS, BOS, UNK, MASK = range(5)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4000) -> PreTrainedTokenizerFast:
    """A BPE tokenizer (SentencePiece-style ``▁`` word boundaries) trained on ``texts``; appends
    ``</s>`` to every sequence.  Ids 0-4 are ``<pad> </s> <s> <unk> <mask>``.

    BPE because it is deterministic: measured with tokenizers 0.23 on the shipped corpus (vocab 4000,
    three trainings each, in one process and in separate ones, with and without RAYON_NUM_THREADS=1),
    the BPE trainer gave the same vocabulary every time while the unigram and WordPiece trainers gave
    different ones -- so a study re-run trains the same teacher.

    Args:
        texts: the training texts.
        vocab_size: the vocabulary size.

    Returns:
        The tokenizer.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
        mask_token="<mask>",
        cls_token="<s>",
        sep_token="</s>",
    )


def model_config(
    arch: str,
    vocab_size: int,
    d_model: int = 32,
    layers: int = 2,
    decoder_layers: int | None = None,
    heads: int = 4,
    ffn: int | None = None,
    max_positions: int = 256,
    num_labels: int = 2,
    dropout: float = 0.1,
):
    """A config for ``arch`` in bart, mbart, marian, t5, bert, gpt2, llama with the special ids above.

    ``mbart`` is BART with pre-LN layers (a LayerNorm before each sub-layer, and one after each stack):
    the study's from-scratch seq2seq teacher, because post-LN BART trained from scratch at a high
    learning rate collapsed on some corpora (README, "What makes the study's verdict worth reading").
    Its decoder starts from ``</s>`` (mBART's label shift wraps the last non-pad label token, EOS).

    Args:
        arch: the architecture.
        vocab_size: the vocabulary size.
        d_model: the hidden size.
        layers: the layers (of the encoder, for an encoder-decoder).
        decoder_layers: the decoder's layers (default: ``layers``).
        heads: the attention heads.
        ffn: the feed-forward size (default: 4 x ``d_model``).
        max_positions: the position table's size.
        num_labels: the classes of a classifier.
        dropout: the dropout rate.

    Returns:
        The HF config.

    Raises:
        ValueError: an unknown architecture.
    """
    ffn = ffn or 4 * d_model
    dec = layers if decoder_layers is None else decoder_layers
    ids = dict(pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    if arch == "bart":
        return BartConfig(
            vocab_size=vocab_size,
            d_model=d_model,
            encoder_layers=layers,
            decoder_layers=dec,
            encoder_attention_heads=heads,
            decoder_attention_heads=heads,
            encoder_ffn_dim=ffn,
            decoder_ffn_dim=ffn,
            max_position_embeddings=max_positions,
            decoder_start_token_id=BOS,
            forced_eos_token_id=EOS,
            dropout=dropout,
            **ids,
        )
    if arch == "mbart":
        return MBartConfig(
            vocab_size=vocab_size,
            d_model=d_model,
            encoder_layers=layers,
            decoder_layers=dec,
            encoder_attention_heads=heads,
            decoder_attention_heads=heads,
            encoder_ffn_dim=ffn,
            decoder_ffn_dim=ffn,
            max_position_embeddings=max_positions,
            decoder_start_token_id=EOS,
            forced_eos_token_id=EOS,
            dropout=dropout,
            **ids,
        )
    if arch == "marian":
        return MarianConfig(
            vocab_size=vocab_size,
            d_model=d_model,
            encoder_layers=layers,
            decoder_layers=dec,
            encoder_attention_heads=heads,
            decoder_attention_heads=heads,
            encoder_ffn_dim=ffn,
            decoder_ffn_dim=ffn,
            max_position_embeddings=max_positions,
            decoder_start_token_id=PAD,
            decoder_vocab_size=vocab_size,
            share_encoder_decoder_embeddings=True,
            dropout=dropout,
            **ids,
        )
    if arch == "t5":
        return T5Config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=d_model // heads,
            d_ff=ffn,
            num_layers=layers,
            num_decoder_layers=dec,
            num_heads=heads,
            decoder_start_token_id=PAD,
            dropout_rate=dropout,
            **ids,
        )
    if arch == "bert":
        return BertConfig(
            vocab_size=vocab_size,
            hidden_size=d_model,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            intermediate_size=ffn,
            max_position_embeddings=max_positions,
            num_labels=num_labels,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            **ids,
        )
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=d_model,
            n_layer=layers,
            n_head=heads,
            n_inner=ffn,
            n_positions=max_positions,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            **ids,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=d_model,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=max_positions,
            **ids,
        )
    raise ValueError(f"unknown architecture {arch!r}")


#: the model kind of each architecture's LM head (build a model of it with lmkd.models.loading.AUTO_CLASS[kind])
ARCH_KINDS = {
    "bart": SEQ2SEQ,
    "mbart": SEQ2SEQ,
    "marian": SEQ2SEQ,
    "t5": SEQ2SEQ,
    "bert": MLM,
    "gpt2": CAUSAL,
    "llama": CAUSAL,
}


def build_model(arch: str, vocab_size: int, kind: str | None = None, seed: int = 0, **sizes):
    """A freshly initialised model of ``arch``.

    Args:
        arch: the architecture (see :func:`model_config`).
        vocab_size: the vocabulary size.
        kind: the model kind; defaults to the architecture's LM head, ``classification`` gives a
            sequence classifier.
        seed: the initialisation seed.
        **sizes: :func:`model_config`'s size arguments.

    Returns:
        The model.
    """
    import torch

    torch.manual_seed(seed)
    config = model_config(arch, vocab_size, **sizes)
    return AUTO_CLASS[kind or ARCH_KINDS[arch]].from_config(config)
