"""The teacher side of a run: loading, placing and freezing a teacher, and wiring a cached teacher
(``lmkd cache-logits``) or a teacher of another tokenizer into a trainer.

Layer 3: takes plain values and a training-arguments object (read, never imported), so that the
trainer (layer 4) calls it and not the other way round.

* :func:`load_frozen_teacher` -- a model or path -> the frozen teacher on the student's device in
  ``teacher_dtype``, with the vocabulary guard (:func:`lmkd.models.vocabulary.shared_vocab_size`);
  under ZeRO-3 in a DeepSpeed inference engine of its own (:mod:`lmkd.teacher.deepspeed_engine`);
* :func:`check_teacher_kind`, :func:`teacher_paths`, :func:`forward_at_floor` -- also what the
  teacher ensembles of :mod:`lmkd.teacher.ensemble` are built with;
* :func:`attach_logit_cache` / :func:`attach_logit_caches` -- the training (and validation)
  data and collators of a run trained from a cache;
* :func:`attach_teacher_tokenizer` -- the collator of a teacher with another tokenizer
  (cross-tokenizer KD, :mod:`lmkd.teacher.cross_tokenizer`).
"""

from __future__ import annotations

import logging

import torch

from lmkd.core.constants import CAUSAL, SEQ2SEQ
from lmkd.core.errors import LmkdError
from lmkd.models.loading import load_model, load_tokenizer, model_kind, saved_kind, unwrap
from lmkd.models.truncation import input_limit, target_limit, tokenizer_limit
from lmkd.models.vocabulary import shared_vocab_size, vocab_size_of
from lmkd.teacher import cross_tokenizer, fsdp_teacher, logit_cache
from lmkd.teacher.deepspeed_engine import deepspeed_teacher, zero3_enabled

logger = logging.getLogger(__name__)

#: config flags that make a forward return more than the logits; a teacher runs with them off
_EXTRA_OUTPUT_FLAGS = ("use_cache", "output_hidden_states", "output_attentions")
#: why a run trained from a logit cache with validation data needs a cache of those too
EVAL_CACHE_NEEDED = (
    "eval_loss is the same CE+KD mix with a logit cache as with an online teacher, so the "
    "validation data need the teacher's logits too: cache them (lmkd cache-logits --data "
    "VALIDATION_FILE --output DIR, same settings) and set eval_logit_cache DIR, or drop the "
    "validation data"
)


def forward_at_floor(model) -> None:
    """Turn off the KV cache and the hidden-state/attention outputs in ``model.config``: a
    teacher returns them only when a loss asks for them as a forward keyword.

    Args:
        model: the teacher (its config is changed in place).
    """
    for flag in _EXTRA_OUTPUT_FLAGS:
        if getattr(model.config, flag, None):
            setattr(model.config, flag, False)


def check_teacher_kind(teacher, kind: str, path: str) -> None:
    """Refuse a teacher checkpoint (a model or its config) saved as another kind of model than the
    student (loaded with the student's auto class it may load all the same, e.g. BART as
    BartForCausalLM, and fail later).

    Args:
        teacher: the teacher model or its config.
        kind: the student's model kind.
        path: the teacher's path, for the error.

    Raises:
        LmkdError: the checkpoint was saved as another kind.
    """
    saved = saved_kind(teacher)
    if saved is not None and saved != kind:
        arch = getattr(teacher, "config", teacher).architectures[0]
        raise LmkdError(
            f"teacher {path} is a {saved} model ({arch}) but the student a {kind} model; distil "
            "between models of the same kind"
        )


def shares_decoder_inputs(teacher, student) -> bool:
    """Whether a seq2seq ``teacher`` reads the student's decoder inputs as its own: the same model
    class (the same label shift -- mBART's wraps the last token, BART's prepends a start token) and
    the same ``decoder_start_token_id``.

    When not (a Marian teacher, start ``<pad>``, for a BART student, start ``</s>``), the
    teacher's decoder inputs are built from the labels by the teacher itself.

    Args:
        teacher: the teacher (wrapped or not; an ensemble: every member must).
        student: the student (wrapped or not).

    Returns:
        True when the student's decoder inputs serve the teacher.
    """
    t, s = unwrap(teacher), unwrap(student)
    if hasattr(t, "teachers"):  # an ensemble: every member must
        return all(shares_decoder_inputs(m, student) for m in t.teachers)
    return type(t) is type(s) and getattr(t.config, "decoder_start_token_id", None) == getattr(
        s.config, "decoder_start_token_id", None
    )


def teacher_paths(args) -> list[str]:
    """The teachers named by ``args.teacher_model_name_or_path`` (a comma-separated list for an
    ensemble).

    Args:
        args: the run's config (``teacher_model_name_or_path``, may be None).

    Returns:
        The paths, stripped, empty entries dropped.
    """
    return [p.strip() for p in (args.teacher_model_name_or_path or "").split(",") if p.strip()]


# ---- one teacher ---------------------------------------------------------------------------------


def load_frozen_teacher(
    source,
    *,
    kind: str,
    student,
    student_tokenizer,
    teacher_tokenizer=None,
    device=None,
    dtype: str = "auto",
    deepspeed_config: dict | None = None,
    cross_tokenizer: bool = False,
    accelerator=None,
):
    """(teacher, shared vocabulary size or None) for ``source``: in ``eval()`` with gradients off
    and its extra outputs off, on ``device`` in ``dtype``, or -- with a ZeRO-3
    ``deepspeed_config`` -- in a DeepSpeed engine of its own, or -- under FSDP2 -- sharded for
    inference (:func:`lmkd.teacher.fsdp_teacher.shard_teacher`).

    The vocabulary size is what both logits are sliced to when the two output layers differ only
    by padding rows (see :func:`lmkd.models.vocabulary.shared_vocab_size`).

    Args:
        source: a model, or a path to load as a ``kind`` model.
        kind: the student's model kind.
        student: the student (its dtype for ``auto``; its vocabulary for the guard).
        student_tokenizer: the student's tokenizer.
        teacher_tokenizer: the teacher's tokenizer (None: loaded from a path ``source`` if there).
        device: where the teacher goes (not under ZeRO-3).
        dtype: a torch dtype name, or ``auto``: the student's (the only choice under ZeRO-3).
        deepspeed_config: the run's DeepSpeed config (None: no DeepSpeed).
        cross_tokenizer: the teacher has its own tokenizer: no vocabulary guard (size None).
        accelerator: the Trainer's accelerator (None: no FSDP); under FSDP2 the teacher is sharded.

    Returns:
        (the frozen teacher or its engine, the shared vocabulary size or None).

    Raises:
        LmkdError: no teacher, a teacher of another kind, a ``dtype`` under ZeRO-3,
            vocabularies that do not match, or FSDP's ``cpu_ram_efficient_loading`` (the teacher
            would keep uninitialised weights on every process but the first).
    """
    if source is None:
        raise LmkdError(
            "kd_alpha > 0 (or a hidden/attention/relation weight > 0) needs a teacher: set "
            "teacher_model_name_or_path (or pass teacher_model=...), or set kd_alpha 0 for "
            "plain fine-tuning"
        )
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if isinstance(source, str) and getattr(plugin, "cpu_ram_efficient_loading", False):
        raise LmkdError(
            "FSDP's cpu_ram_efficient_loading loads weights on the first process only and leaves the "
            "teacher uninitialised on the others: set fsdp_cpu_ram_efficient_loading false in the "
            "accelerate config (recipes/accelerate/fsdp2.yaml)"
        )
    teacher = source
    if isinstance(source, str):
        if teacher_tokenizer is None:
            teacher_tokenizer = load_tokenizer(source, required=False)
        teacher = load_model(source, kind=kind)
        check_teacher_kind(teacher, kind, source)
    if model_kind(teacher) != kind:
        raise LmkdError(
            f"teacher is a {model_kind(teacher)} model but the student a {kind} model; "
            "distil between models of the same kind"
        )
    zero3 = zero3_enabled(deepspeed_config)
    if not zero3:
        torch_dtype = (
            next(unwrap(student).parameters()).dtype if dtype == "auto" else getattr(torch, dtype)
        )
        teacher = teacher.to(device=device, dtype=torch_dtype)
    elif dtype != "auto":
        raise LmkdError(
            f"teacher_dtype {dtype} is not supported under DeepSpeed ZeRO-3: the teacher takes the "
            "precision of the DeepSpeed config (bf16/fp16); set teacher_dtype auto"
        )
    teacher.eval()
    teacher.requires_grad_(False)
    forward_at_floor(teacher)
    # (logs what it decided from); a cross-tokenizer teacher (teacher_tokenizer) has its own vocabulary
    vocab = (
        None
        if cross_tokenizer
        else shared_vocab_size(student, teacher, student_tokenizer, teacher_tokenizer)
    )
    if zero3:
        return deepspeed_teacher(teacher, deepspeed_config), vocab
    if fsdp_teacher.fsdp2_enabled(accelerator):
        return fsdp_teacher.shard_teacher(teacher, fsdp_teacher.fsdp_mesh(accelerator)), vocab
    return teacher, vocab


# ---- the cached teacher (lmkd.teacher.logit_cache) -------------------------------------------------------


def attach_logit_cache(
    path: str,
    *,
    kind: str,
    student,
    train_dataset,
    collator,
    padding_side: str = "right",
    what: str = "training",
):
    """(cache, training data, collator) of a run trained from `lmkd cache-logits` output: each
    training row tagged with its cache row, the cached top-K collated with each batch.  Checks
    that the cache's token ids fit the student's outputs.

    Args:
        path: the cache directory.
        kind: the student's model kind.
        student: the student (its output size).
        train_dataset: the tokenised rows the cache was made from (None: not tagged).
        collator: the run's collator, wrapped.
        padding_side: the side the collator pads on.
        what: ``training`` or ``validation``, for the errors.

    Returns:
        (the :class:`lmkd.teacher.logit_cache.LogitCache`, the tagged data, a
        :class:`lmkd.teacher.logit_cache.CachedLogitsCollator`).

    Raises:
        LmkdError: the data are not a ``datasets.Dataset`` or do not match the cache, or the cache
            holds a token id beyond the student's outputs.
    """
    cache = logit_cache.LogitCache(path)
    if train_dataset is not None:
        if not hasattr(train_dataset, "column_names"):
            raise LmkdError(
                f"a logit cache needs the {what} data as a datasets.Dataset (tokenised, with "
                "the rows the cache was made from)"
            )
        train_dataset = logit_cache.attach_cache(train_dataset, cache, kind, what)
    top = max((int(s["ids"].max()) for s in cache.shards if len(s["ids"])), default=0)
    if top >= vocab_size_of(student):
        raise LmkdError(
            f"the logit cache {cache.path} holds token id {top} but the student has only "
            f"{vocab_size_of(student)} outputs; cache with the student's teacher and tokenizer"
        )
    return cache, train_dataset, logit_cache.CachedLogitsCollator(collator, cache, padding_side)


def attach_logit_caches(
    args, *, kind: str, student, train_dataset, eval_dataset, collator, padding_side: str = "right"
):
    """(training data, collator, validation data, validation collator or None) of a run trained from
    ``args.logit_cache`` (:func:`attach_logit_cache`).

    With a KD term, validation data need ``args.eval_logit_cache`` too: eval_loss is the training
    loss's CE + KD mix with an online teacher, and without the teacher's logits on the validation
    data it would silently be CE alone.

    Args:
        args: the run's config (``logit_cache``, ``eval_logit_cache``, ``kd_alpha``).
        kind: the student's model kind.
        student: the student.
        train_dataset: the tokenised training rows.
        eval_dataset: the tokenised validation rows, or None.
        collator: the run's collator.
        padding_side: the side the collator pads on.

    Returns:
        (training data, training collator, validation data, validation collator or None).

    Raises:
        LmkdError: validation data with a KD term but no ``eval_logit_cache``, a dict of
            validation sets, or as :func:`attach_logit_cache`.
    """
    _, train_dataset, train_collator = attach_logit_cache(
        args.logit_cache,
        kind=kind,
        student=student,
        train_dataset=train_dataset,
        collator=collator,
        padding_side=padding_side,
    )
    eval_collator = None
    if args.kd_alpha > 0 and eval_dataset is not None:
        if not args.eval_logit_cache:
            raise LmkdError(EVAL_CACHE_NEEDED)
        if isinstance(eval_dataset, dict):
            raise LmkdError(
                "eval_logit_cache covers one validation set; pass one eval_dataset, not a dict"
            )
        _, eval_dataset, eval_collator = attach_logit_cache(
            args.eval_logit_cache,
            kind=kind,
            student=student,
            train_dataset=eval_dataset,
            collator=collator,
            padding_side=padding_side,
            what="validation",
        )
    return train_dataset, train_collator, eval_dataset, eval_collator


# ---- a teacher of another tokenizer (lmkd.teacher.cross_tokenizer) ---------------------------------------------


def check_cross_tokenizer_kind(kind: str) -> None:
    """Cross-tokenizer KD (``teacher_tokenizer``) aligns the positions of generated text (a causal
    LM's tokens, a seq2seq decoder's targets); refuse the kinds that generate none.

    Args:
        kind: the student's model kind.

    Raises:
        LmkdError: ``kind`` is neither causal nor seq2seq.
    """
    if kind not in (CAUSAL, SEQ2SEQ):
        raise LmkdError(
            f"teacher_tokenizer (cross-tokenizer KD) works with causal LMs and seq2seq models, not "
            f"{kind} models: their outputs are per input token or per example, which another "
            "tokenizer does not share; distil from a teacher with the student's tokenizer"
        )


def attach_teacher_tokenizer(
    collator,
    *,
    kind: str,
    student_tokenizer,
    teacher,
    teacher_tokenizer,
    kd_loss: str,
    limits: tuple[int | None, int | None] | None = None,
):
    """(collator, shared token ids or None) of cross-tokenizer KD with ``teacher_tokenizer``: the
    collator re-tokenises each batch for the teacher and aligns the positions
    (:class:`lmkd.teacher.cross_tokenizer.CrossTokenizerCollator`); ``kd_loss`` uld_hybrid also
    gets the (student ids, teacher ids) of the token strings both vocabularies hold.

    Args:
        collator: the student's collator, wrapped.
        kind: the student's model kind (causal or seq2seq).
        student_tokenizer: the student's fast tokenizer.
        teacher: the teacher (its input and target length limits), or None with ``limits``.
        teacher_tokenizer: a fast tokenizer, or the path to load it from.
        kd_loss: the run's KD loss.
        limits: without ``teacher`` (a served one): the (input, target) tokens the teacher takes
            (None: no limit); the tokenizer's own limit counts too.

    Returns:
        (the wrapping collator, the shared (student ids, teacher ids) or None).

    Raises:
        LmkdError: a kind that generates no text, or a tokenizer that is not fast.
    """
    check_cross_tokenizer_kind(kind)
    t_tok = (
        load_tokenizer(teacher_tokenizer)
        if isinstance(teacher_tokenizer, str)
        else teacher_tokenizer
    )
    if not getattr(t_tok, "is_fast", False) or not getattr(student_tokenizer, "is_fast", False):
        raise LmkdError(
            "cross-tokenizer KD aligns positions by character offsets, which only fast tokenizers "
            "give: use the tokenizer.json (fast) versions of both tokenizers"
        )
    if teacher is not None:
        max_length, target_length = (
            input_limit(unwrap(teacher), t_tok),
            target_limit(unwrap(teacher)),
        )
    else:
        given, target_length = limits or (None, None)
        max_length = min(
            (n for n in (given, tokenizer_limit(t_tok)) if n is not None), default=None
        )
    if kind == SEQ2SEQ:  # the source for the teacher's encoder, the target for its decoder
        collator = cross_tokenizer.Seq2SeqCrossTokenizerCollator(
            collator,
            student_tokenizer,
            t_tok,
            teacher_max_length=max_length,
            teacher_target_length=target_length,
        )
    else:
        collator = cross_tokenizer.CrossTokenizerCollator(
            collator, student_tokenizer, t_tok, teacher_max_length=max_length
        )
    shared = None
    if kd_loss == "uld_hybrid":
        shared = cross_tokenizer.shared_vocabulary(student_tokenizer, t_tok)
        logger.info("uld_hybrid: %d token strings shared by the two vocabularies", len(shared[0]))
    return collator, shared
