"""Sequence-level KD (Kim & Rush 2016): teacher pseudo-targets, Seq-Inter selection and filtering.

:func:`generate_pseudo_targets` runs the teacher over a dataset and writes a ``datasets``
dataset (``save_to_disk``) or JSON lines with the original columns plus

- ``teacher_target``: the pseudo-target the student trains on (``target_column: teacher_target``);
- ``teacher_score``: its length-normalised log-probability under the teacher (mean log p per token,
  teacher-forced, no repetition controls);
- with ``num_return_sequences`` K > 1, ``teacher_nbest`` and ``teacher_nbest_scores``: all K
  hypotheses, best first, and their scores;
- with a filter, ``teacher_<metric>``: the hypothesis' sentence score against the reference.

How it is fast, reproducible and restartable:

- inputs are sorted by token length (longest first) so a batch holds inputs of similar length and
  little padding; every output is written with its input index and the result is in input order;
- the sorted inputs are cut into *chunks* of ``chunk_size`` examples; process ``r`` of ``n``
  (``accelerate launch``) takes chunks ``r, r+n, r+2n, ...``, and each finished chunk is written to
  its own file (temp name, then rename) under ``<output>/chunks``: a killed run started again with
  the same command skips the chunks that exist, and the main process merges them in input order;
- the settings that decide the output are recorded in ``<output>/lmkd_generate.json``; resuming
  with different settings is refused.  The batch size is *not* one of them: outputs do not depend
  on how inputs are batched (attention masks hide the padding -- left padding for decoder-only
  teachers, with positions from the mask; sampling draws its noise per example and step, not from
  a global stream), so a run that ran out of memory can resume with a smaller batch.  "Do not
  depend" holds up to floating-point rounding: padding changes the shapes of a batch's matrix
  products and so their last bits, which can reorder n-best hypotheses whose scores tie to about
  1e-5 (in the tests' 64-row checks: top hypotheses always equal, a few tied lower ranks swapped).

Seq-Inter and the filters (:mod:`lmkd.teacher.selection`) are pure functions on lists of strings,
usable on their own; the output directory's files (the settings record, the chunks, their merge,
reading the result back) are in :mod:`lmkd.teacher.pseudo_target_files`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from types import SimpleNamespace

import torch

from lmkd.core.constants import AUTO_DTYPE_NAMES, CAUSAL, SEQ2SEQ
from lmkd.core.errors import LmkdError
from lmkd.core.io import atomic_write_text, check_output
from lmkd.data import chat
from lmkd.models.generation import length_batches, longest_first
from lmkd.models.loading import kind_from_config, load_model, load_tokenizer, model_kind
from lmkd.models.nbest import generate_batch
from lmkd.models.truncation import (
    describe_truncation,
    encode_fitted,
    generation_lengths,
    input_limit,
    target_limit,
    truncation_note,
)
from lmkd.teacher.pseudo_target_files import (
    CHUNK_DIR,
    SETTINGS_FILE,
    GenerationSettings,
    merge,
    recorded_settings,
)

logger = logging.getLogger(__name__)


def _load_rows(data) -> list[dict]:
    if isinstance(data, (list, tuple)):
        return [dict(r) for r in data]
    import datasets

    if isinstance(data, datasets.Dataset):
        return data.to_list()
    from lmkd.data.reading import load_data

    return load_data(str(data)).to_list()


def _teacher_and_tokenizer(teacher, tokenizer, dtype: str):
    if isinstance(teacher, (str, os.PathLike)):
        path = str(teacher)
        model = load_model(path, kind=kind_from_config(path), dtype=dtype)
        return model, (tokenizer if tokenizer is not None else load_tokenizer(path))
    if tokenizer is None:
        raise LmkdError("pass the teacher's tokenizer along with a teacher model object")
    if dtype != "auto":
        teacher = teacher.to(getattr(torch, dtype))
    return teacher, tokenizer


def generate_pseudo_targets(
    teacher,
    tokenizer=None,
    data=None,
    output_dir: str | None = None,
    *,
    source_column: str = "source",
    source_prefix: str = "",
    max_source_length: int = 512,
    num_beams: int | None = None,
    num_return_sequences: int = 1,
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    repetition_penalty: float = 1.0,
    batch_size: int | None = 32,
    max_tokens: int | None = None,
    chunk_size: int = 1024,
    output_format: str = "arrow",
    select: str | None = None,
    reference_column: str | None = None,
    filter_metric: str | None = None,
    filter_min: float | None = None,
    dtype: str = "auto",
    sort_by_length: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
    chat_template: str | None = None,
) -> dict:
    """Generate teacher pseudo-targets for every row of ``data`` into ``output_dir``.

    ``teacher`` is a checkpoint path (the tokenizer is loaded from it) or a model object (then pass
    ``tokenizer``).  ``data`` is a file/dir :func:`lmkd.data.reading.load_data` reads, a ``datasets.Dataset``
    or a list of dicts.  Returns a report: rows generated, rows changed by Seq-Inter, rows dropped
    by the filter, seconds, examples/s, the truncation notes (``truncation``: inputs cut to the
    teacher's table or ``max_source_length``, ``max_new_tokens`` lowered to what its table holds;
    see :func:`lmkd.models.truncation.generation_lengths`) and the output path.  Run under ``accelerate launch`` to
    split the work across processes; call again with the same arguments to resume.  ``num_beams``
    defaults to 5 (Kim & Rush), or 1 with ``do_sample`` (sampling draws from one beam).

    ``on_chunk``, when given, is called after each chunk this process generates is durably written,
    with the number of chunks this call has written so far (a progress hook; what it raises stops
    the run as a kill would, and the same call resumes it).

    Args:
        teacher: a seq2seq or causal checkpoint path, or a model object.
        tokenizer: the teacher's tokenizer (needed with a model object; None: loaded from the
            path).
        data: a file/dir, a ``datasets.Dataset`` or a list of dicts.
        output_dir: the output directory (resumed when it holds the same settings).
        source_column: the input column.
        source_prefix: text put before every input.
        max_source_length: inputs are cut to this many tokens (and the teacher's table).
        num_beams: beams (None: 5, or 1 with ``do_sample``).
        num_return_sequences: hypotheses kept per row (K > 1: an n-best list).
        max_new_tokens: the most tokens generated per row.
        do_sample: sample instead of beam search.
        temperature: the sampling temperature (> 0).
        top_k: sample from the K likeliest tokens only (None: all).
        top_p: nucleus sampling's mass (None: off).
        seed: seeds the sampling.
        length_penalty: beam search's length penalty.
        no_repeat_ngram_size: forbid repeating n-grams of this size (0: off).
        repetition_penalty: the penalty on repeated tokens (1: none).
        batch_size: rows per batch (None: ``max_tokens`` alone decides).
        max_tokens: the most tokens per batch (None: ``batch_size`` alone decides).
        chunk_size: rows per durably written chunk (the unit of resuming).
        output_format: ``arrow`` or ``jsonl``.
        select: ``seq-inter`` (Seq-Inter among the n-best), or None.
        reference_column: the references for ``select`` and the filter.
        filter_metric: drop rows whose sentence score (this metric) is below ``filter_min``.
        filter_min: the lowest score kept (0-100).
        dtype: the teacher's dtype (``auto``, float32, bfloat16 or float16).
        sort_by_length: generate the longest rows first (less padding).
        overwrite: start again in a directory made with other settings or holding other files.
        progress: show the progress bar.
        on_chunk: called with the chunks written so far, after each chunk.
        chat_template: causal teacher, rows of chat messages: a Jinja template file (None: the
            tokenizer's own).  Each row's prompt (before its last assistant turn) is rendered
            and answered; the output's ``teacher_messages`` is the conversation with the
            teacher's answer as its last turn (:mod:`lmkd.data.chat`).

    Returns:
        The report described above.

    Raises:
        LmkdError: no data or output directory, a setting out of range or inconsistent, a
            teacher that does not generate, empty data, a missing column, or an output
            directory made with other settings (without ``overwrite``).
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    if output_dir is None or data is None:
        raise LmkdError("generate needs data and an output directory")
    if batch_size is None and max_tokens is None:
        raise LmkdError("give --batch-size or --max-tokens")
    if (batch_size is not None and batch_size < 1) or (max_tokens is not None and max_tokens < 1):
        raise LmkdError("--batch-size and --max-tokens must be at least 1")
    check_output(
        str(output_dir), "--output", directory=True
    )  # (its first chunk is written after a batch)
    # cpu=True when there is no GPU: otherwise accelerate runs every torchrun process alone (non-distributed)
    state = PartialState(
        cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
        or not torch.cuda.is_available()
    )
    if dtype not in AUTO_DTYPE_NAMES:
        raise LmkdError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16")
    if isinstance(teacher, (str, os.PathLike)):
        teacher_name = str(teacher)
        kind = kind_from_config(
            teacher_name
        )  # reads only the config: fail fast before loading weights
    else:
        teacher_name = (
            getattr(getattr(teacher, "config", None), "name_or_path", "") or type(teacher).__name__
        )
        kind = model_kind(teacher)
    if kind not in (SEQ2SEQ, CAUSAL):
        raise LmkdError(f"the teacher is a {kind} model; generation needs a seq2seq or causal LM")
    rows = _load_rows(data)
    if not rows:
        raise LmkdError("the data is empty; it needs at least one row")
    chat_args = SimpleNamespace(
        task="causal-lm", source_column=source_column, chat_template=chat_template
    )
    chat_rows = kind == CAUSAL and (
        chat.row_format(rows[0], chat_args) == chat.MESSAGES
        or isinstance(rows[0].get(chat.PROMPT_COLUMN), list)  # prompt/completion messages
    )
    if chat_template and not chat_rows:
        raise LmkdError(
            "--chat-template renders rows of chat messages for a causal LM teacher; these rows "
            "are text (or the teacher is not causal): drop it"
        )
    if chat_rows:  # the teacher answers each conversation's prompt (before its last answer)
        if tokenizer is None:
            tokenizer = load_tokenizer(teacher_name)
        chat.check_chat_data(rows[0], tokenizer, chat_args)
        sources = [chat.prompt_and_response(r, tokenizer, chat_args)[0] for r in rows]
    elif source_column not in rows[0]:
        raise LmkdError(
            f"the data has no column {source_column!r} (it has: {', '.join(rows[0])}); "
            "name the input column with --source-column"
        )
    if reference_column is not None and reference_column not in rows[0]:
        raise LmkdError(
            f"the data has no reference column {reference_column!r} (it has: {', '.join(rows[0])}); "
            "fix --reference-column"
        )
    if not chat_rows:
        sources = [source_prefix + str(r[source_column]) for r in rows]
    digest = hashlib.sha256("\x00".join(sources).encode()).hexdigest()
    if (
        num_beams is None
    ):  # the default: beam search with 5 beams (Kim & Rush), one "beam" when sampling
        num_beams = 1 if do_sample else 5
    settings = GenerationSettings(
        teacher=teacher_name,
        data_rows=len(rows),
        data_sha256=digest,
        source_column=source_column,
        source_prefix=source_prefix,
        max_source_length=max_source_length,
        num_beams=num_beams,
        num_return_sequences=num_return_sequences,
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        repetition_penalty=repetition_penalty,
        dtype=dtype,
        chunk_size=chunk_size,
        sort_by_length=sort_by_length,
        select=select,
        reference_column=reference_column,
        filter_metric=filter_metric,
        filter_min=filter_min,
        output_format=output_format,
        chat_column=chat.data_columns(rows[0], chat_args)[0] if chat_rows else None,
    )
    settings.check()

    # -- the output directory: new, resumable, or finished --------------------------------------
    settings_path = os.path.join(output_dir, SETTINGS_FILE)
    chunk_dir = os.path.join(output_dir, CHUNK_DIR)
    settings_json = json.loads(json.dumps(recorded_settings(settings)))
    if not overwrite and os.path.isfile(settings_path):
        with open(settings_path, encoding="utf-8") as f:
            recorded = json.load(f)
        old = recorded.get("settings", {})
        if old != settings_json:
            diff = sorted(
                k for k in set(old) | set(settings_json) if old.get(k) != settings_json.get(k)
            )
            raise LmkdError(
                f"{output_dir} was made with different settings ({', '.join(diff)}); re-run with "
                "the original options to resume, or choose another --output (or pass --overwrite)"
            )
        if recorded.get("complete"):
            logger.info("%s is already complete; nothing to do", output_dir)
            return dict(recorded.get("report", {}), output=output_dir, already_complete=True)
    elif not overwrite and os.path.isdir(output_dir) and os.listdir(output_dir):
        raise LmkdError(
            f"output directory {output_dir} exists and was not written by lmkd generate; choose "
            "another --output or pass --overwrite"
        )
    state.wait_for_everyone()  # every process has checked the directory before the main one changes it
    if state.is_main_process:
        if overwrite and os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.makedirs(chunk_dir, exist_ok=True)
        if not os.path.isfile(settings_path):
            atomic_write_text(
                settings_path, json.dumps({"settings": settings_json, "complete": False}, indent=1)
            )
    state.wait_for_everyone()

    # -- tokenise, sort, chunk ------------------------------------------------------------------
    model, tokenizer = _teacher_and_tokenizer(teacher, tokenizer, dtype)
    # the one truncation rule (lmkd.models.loading): inputs and new tokens fitted to the teacher's tables
    src_len, new = generation_lengths(model, tokenizer, max_source_length, max_new_tokens)
    # a rendered chat prompt holds its special tokens already (as apply_chat_template tokenises)
    encoded, cut = encode_fitted(tokenizer, sources, src_len, special_tokens=not chat_rows)
    enc = encoded["input_ids"]
    truncation = {
        "inputs": truncation_note(
            "inputs", len(rows), len(cut), src_len, max_source_length, input_limit(model, tokenizer)
        ),
        "new tokens": truncation_note(
            "new tokens",
            len(rows),
            len(rows) if new < max_new_tokens else 0,
            new,
            max_new_tokens,
            target_limit(model),
        ),
    }
    if state.is_main_process:
        for note in truncation.values():
            (logger.warning if note["truncated"] else logger.info)(
                "generate: %s", describe_truncation(note)
            )
    decoding = replace(settings, max_new_tokens=new)  # the settings file keeps what was asked for
    lengths = [len(x) for x in enc]
    order = longest_first(lengths) if sort_by_length else list(range(len(rows)))
    chunks = [order[i : i + chunk_size] for i in range(0, len(order), chunk_size)]
    mine = [c for c in range(len(chunks)) if c % state.num_processes == state.process_index]
    todo = [c for c in mine if not os.path.isfile(os.path.join(chunk_dir, f"chunk-{c:06d}.jsonl"))]
    done_rows = sum(len(chunks[c]) for c in mine if c not in todo)
    if done_rows:
        logger.info(
            "resuming: process %d has %d of its %d chunks done",
            state.process_index,
            len(mine) - len(todo),
            len(mine),
        )

    model.eval()
    model.to(state.device)
    start = time.perf_counter()
    generated = 0
    bar = tqdm(
        total=sum(len(chunks[c]) for c in mine),
        initial=done_rows,
        unit="ex",
        desc="generating",
        disable=not (progress and state.is_local_main_process),
        dynamic_ncols=True,
    )
    try:
        for n_written, c in enumerate(todo, 1):
            lines = []
            for batch in length_batches(chunks[c], lengths, batch_size, max_tokens):
                outs = generate_batch(
                    model, tokenizer, [enc[i] for i in batch], batch, decoding, kind
                )
                for i, o in zip(batch, outs):
                    lines.append(json.dumps({"_index": i, **o}, ensure_ascii=False))
                bar.update(len(batch))
                generated += len(batch)
            atomic_write_text(
                os.path.join(chunk_dir, f"chunk-{c:06d}.jsonl"), "\n".join(lines) + "\n"
            )
            if on_chunk is not None:
                on_chunk(n_written)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    state.wait_for_everyone()

    report = {
        "rows": len(rows),
        "generated_here": generated,
        "seconds": round(seconds, 3),
        "examples_per_second": round(generated / seconds, 2) if seconds > 0 else None,
        "truncation": truncation,
        "output": output_dir,
    }
    if state.is_main_process:
        report.update(merge(rows, chunks, settings, output_dir))
        atomic_write_text(
            settings_path,
            json.dumps(
                {
                    "settings": recorded_settings(settings),
                    "complete": True,
                    "report": {k: v for k, v in report.items() if k != "output"},
                },
                indent=1,
            ),
        )
        shutil.rmtree(chunk_dir, ignore_errors=True)
    state.wait_for_everyone()
    return report


__all__ = ["generate_pseudo_targets"]
