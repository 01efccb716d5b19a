"""Writing a logit cache: the body of ``lmkd cache-logits``.  The teacher runs once over the
training data and, shard by shard, its top-K log-probabilities, tail bucket and (optionally)
sampled tail per KD position are written in the layout :mod:`lmkd.teacher.logit_cache` describes
and reads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict

import numpy as np
import torch

from lmkd.core.constants import CAUSAL, IGNORE_INDEX, SEQ2SEQ, TASK_KIND
from lmkd.core.errors import LmkdError
from lmkd.core.io import atomic_write_json, check_output, replace_dir
from lmkd.models.generation import longest_first
from lmkd.teacher.logit_cache import (
    FORMAT_VERSION,
    LOGPROB_DTYPES,
    LogitCache,
    id_dtype,
    stored_logprobs,
)
from lmkd.teacher.logit_cache import targets as logit_cache_targets

logger = logging.getLogger(__name__)


@torch.inference_mode()
def teacher_topk(teacher, kind, batch, top_k, tail_samples=0, generator=None):
    """(ids, logprobs, tail, sample ids, sample logprobs) per KD position of a padded batch, rows
    in order, positions in order; ``tail_samples`` ids per position drawn with replacement from
    the teacher's distribution outside its top-K (None when 0).

    Args:
        teacher: the teacher model.
        kind: its model kind (seq2seq or causal).
        batch: the padded batch on the teacher's device (``labels`` for seq2seq).
        top_k: log-probs kept per position.
        tail_samples: ids drawn per position from the renormalised tail (0: none).
        generator: the torch generator the samples are drawn with.

    Returns:
        The top-K ids and log-probs ``(N, K)``, the tail's log-mass ``(N,)``, and the sampled ids
        and their log-probs ``(N, M)`` or None, for the ``N`` KD positions.
    """
    fwd = {k: v for k, v in batch.items() if k != "labels"}
    if kind == SEQ2SEQ:
        fwd["decoder_input_ids"] = teacher.prepare_decoder_input_ids_from_labels(
            labels=batch["labels"]
        )
        mask = batch["labels"].ne(IGNORE_INDEX)
    else:
        mask = batch["attention_mask"][:, 1:].bool()
    fwd["use_cache"] = False
    logits = teacher(**fwd).logits
    if kind == CAUSAL:
        logits = logits[:, :-1]
    logits = logits[mask].float()
    lp = torch.log_softmax(logits, -1)
    top, ids = lp.topk(top_k, -1)
    rest = lp.scatter(1, ids, float("-inf"))
    tail = torch.logsumexp(rest, -1)
    if not tail_samples:
        return ids, top, tail, None, None
    # sample from the tail renormalised (rows whose tail is empty draw uniformly: weight 0 anyway)
    probs = (rest - tail.unsqueeze(-1)).exp()
    empty = ~torch.isfinite(tail)
    if bool(empty.any()):
        probs[empty] = 1.0
    drawn = torch.multinomial(probs, tail_samples, replacement=True, generator=generator)
    return ids, top, tail, drawn, lp.gather(1, drawn)


def write_shard(path: str, arrays: dict) -> None:
    """Write one shard directory (``name.npy`` per array) atomically: into ``path.tmp``, which
    replaces ``path`` once complete, so an interrupted run leaves no half-written shard.

    Args:
        path: the shard's directory.
        arrays: array name -> numpy array.
    """
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for name, array in arrays.items():
        np.save(os.path.join(tmp, name + ".npy"), array)
    replace_dir(tmp, path)


#: the DataArguments of ``dataset_name``: in a cache's meta only when used
DATASET_KEYS = (
    "dataset_name",
    "dataset_config_name",
    "train_split",
    "validation_split",
    "source_lang",
    "target_lang",
)


def cache_logits(
    teacher_path: str,
    data_args,
    output: str,
    top_k: int,
    *,
    batch_size: int = 16,
    shard_rows: int = 1024,
    logprob_dtype: str = "float16",
    teacher_dtype: str = "auto",
    device: str | None = None,
    overwrite: bool = False,
    tail_samples: int = 0,
    seed: int = 0,
    progress: bool | None = None,
) -> dict:
    """Run the teacher over ``data_args.train_file`` (or ``dataset_name``'s ``train_split``) and write
    its top-K log-probs to ``output``.

    ``data_args`` is a :class:`lmkd.data.dataset.DataArguments` (task, columns, max lengths, prefix): the
    same values must be used for training, so the positions match.  ``tail_samples`` M > 0 also
    stores M token ids per position drawn from the teacher's distribution outside the top-K (see
    :mod:`lmkd.teacher.logit_cache`), reproducibly from ``seed``.  Inputs and targets are truncated
    by the one rule (:func:`lmkd.models.truncation.fit_length`) to the teacher's tables; training on
    the cache applies the same rule with the same teacher
    (:func:`lmkd.teacher.logit_cache.cache_teacher`).  Returns a summary dict (with
    ``truncation``: the rows cut, :func:`lmkd.models.truncation.truncation_note`).  A tqdm bar counts the
    rows the teacher has read (``progress``: None shows it on a terminal only, as tqdm decides).
    Shards already written are kept, so rerunning the same command finishes an interrupted cache.

    Args:
        teacher_path: the teacher's directory or hub id.
        data_args: the data arguments (task, columns, lengths, prefix, ``max_train_samples``).
        output: the cache directory.
        top_k: log-probs kept per position (>= 1, at most the vocabulary).
        batch_size: rows per teacher forward (>= 1).
        shard_rows: rows per shard (>= 1).
        logprob_dtype: how log-probs are stored (one of :data:`LOGPROB_DTYPES`).
        teacher_dtype: the teacher's dtype (``auto``: as saved).
        device: the device (None: the best available).
        overwrite: replace a cache made with other settings, or a directory that is none.
        tail_samples: token ids per position drawn from outside the top-K (0: none).
        seed: seeds the tail samples (per shard).
        progress: show the progress bar (None: on a terminal only).

    Returns:
        A summary: ``output``, ``rows``, ``positions``, ``shards``, ``shards_skipped``,
        ``top_k``, ``tail_samples``, ``bytes``, ``bytes_per_position`` and ``truncation``.

    Raises:
        LmkdError: a task other than seq2seq or causal-lm, a setting out of range, unreadable
            data, or an ``output`` that holds something else (without ``overwrite``) or cannot
            be written.
    """
    from tqdm.auto import tqdm
    from transformers import DataCollatorForSeq2Seq

    from lmkd.data import chat
    from lmkd.data.reading import read_split
    from lmkd.data.tokenizing import tokenize
    from lmkd.models.loading import load_model, load_tokenizer, resolve_device
    from lmkd.models.vocabulary import vocab_size_of

    kind = TASK_KIND[data_args.task]
    if kind not in (SEQ2SEQ, CAUSAL):
        raise LmkdError(
            f"cache-logits supports translation, summarization and causal-lm, not {data_args.task}"
        )
    if top_k < 1:
        raise LmkdError(f"--top-k must be >= 1, got {top_k}")
    if logprob_dtype not in LOGPROB_DTYPES:
        raise LmkdError(
            f"unknown log-prob dtype {logprob_dtype!r}; choose one of {', '.join(LOGPROB_DTYPES)}"
        )
    if batch_size < 1 or shard_rows < 1:
        raise LmkdError("--batch-size and --shard-rows must be >= 1")
    if tail_samples < 0:
        raise LmkdError(f"--tail-samples must be >= 0, got {tail_samples}")
    dev = resolve_device(
        device
    )  # before anything loads or is written: `--device cuda` without CUDA is one line
    check_output(output, "--output", directory=True)  # (written only after the teacher has run)
    labelled = kind == SEQ2SEQ
    columns = [data_args.source_column] + ([data_args.target_column] if labelled else [])
    ds = read_split(data_args, "train", columns, flags=("--source-column", "--target-column"))
    tokenizer = load_tokenizer(teacher_path)
    if chat.row_format(ds.features, data_args) != chat.TEXT:  # no chat template: one line, now
        chat.check_chat_data(ds.features, tokenizer, data_args)
    teacher = load_model(teacher_path, kind=kind, dtype=teacher_dtype)
    vocab = vocab_size_of(teacher)
    if top_k > vocab:
        raise LmkdError(
            f"--top-k {top_k} is larger than the teacher's vocabulary ({vocab}); use at most {vocab}"
        )
    if data_args.max_train_samples is not None:
        ds = ds.select(range(min(data_args.max_train_samples, len(ds))))
    notes: list = []  # the one truncation rule (lmkd.models.truncation.fit_length): fitted to the teacher's tables
    ds = tokenize(ds, tokenizer, data_args, labelled=labelled, model=teacher, notes=notes)

    meta = {
        "format": FORMAT_VERSION,
        "teacher": os.path.abspath(teacher_path) if os.path.exists(teacher_path) else teacher_path,
        "kind": kind,
        "top_k": top_k,
        "vocab_size": vocab,
        "rows": len(ds),
        "shard_rows": shard_rows,
        "batch_size": batch_size,
        "logprob_dtype": logprob_dtype,
        "id_dtype": np.dtype(id_dtype(vocab)).name,
        "teacher_dtype": teacher_dtype,
        "tail_samples": tail_samples,
        "seed": seed,
        "data": {
            k: v
            for k, v in asdict(data_args).items()
            if k not in ("validation_file", "max_eval_samples")
            and not (k in DATASET_KEYS and v in (None, "train"))
        },  # (file caches keep their old meta)
    }
    meta_path = os.path.join(output, "meta.json")
    if os.path.exists(meta_path) and not overwrite:
        with open(meta_path) as f:
            old = json.load(f)
        if old != json.loads(json.dumps(meta)):
            diff = sorted(k for k in meta if old.get(k) != json.loads(json.dumps(meta))[k])
            raise LmkdError(
                f"{output} holds a cache made with other settings ({', '.join(diff)}); choose "
                "another --output, or pass --overwrite to start it again"
            )
    else:
        if os.path.exists(output) and os.listdir(output):
            if not overwrite:
                raise LmkdError(
                    f"output directory {output} exists and is not a logit cache; choose another "
                    "--output or pass --overwrite"
                )
            shutil.rmtree(output)
        os.makedirs(output, exist_ok=True)
        atomic_write_json(meta_path, meta, indent=1, sort_keys=True)

    teacher.to(dev).eval()
    teacher.requires_grad_(False)
    if kind == SEQ2SEQ:
        collate = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    else:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"

        def collate(rows):
            return tokenizer.pad(rows, return_tensors="pt")

    ids_dtype = id_dtype(vocab)
    n_shards = (len(ds) + shard_rows - 1) // shard_rows
    done = 0
    bar = tqdm(
        total=len(ds),
        desc="cache-logits",
        unit="ex",
        disable=None if progress is None else not progress,
    )
    for shard in range(n_shards):
        path = os.path.join(output, f"shard-{shard:05d}")
        if os.path.isdir(path):
            done += 1
            bar.update(min(len(ds), (shard + 1) * shard_rows) - shard * shard_rows)
            continue
        lo, hi = shard * shard_rows, min(len(ds), (shard + 1) * shard_rows)
        rows = [ds[i] for i in range(lo, hi)]
        targets = [logit_cache_targets(r, kind) for r in rows]
        lengths = np.array([len(t) for t in targets], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        n_pos = int(offsets[-1])
        ids = np.zeros((n_pos, top_k), dtype=ids_dtype)
        lps = np.zeros(
            (n_pos, top_k), dtype=np.uint16 if logprob_dtype == "bfloat16" else logprob_dtype
        )
        tails = np.zeros(n_pos, dtype=lps.dtype)
        s_ids = np.zeros((n_pos, tail_samples), dtype=ids_dtype)
        s_lps = np.zeros((n_pos, tail_samples), dtype=lps.dtype)
        # one generator per shard, seeded by (seed, shard): a resumed cache draws the same samples
        gen = (
            torch.Generator(device=dev).manual_seed(seed * 1_000_003 + shard)
            if tail_samples
            else None
        )
        # length-sorted batches (less padding); the order is fixed, so shards are reproducible
        order = longest_first([len(r["input_ids"]) + n for r, n in zip(rows, lengths.tolist())])
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            keep = ("input_ids", "attention_mask") + (("labels",) if kind == SEQ2SEQ else ())
            # (a causal LM's cache covers every next token; chat rows' labels pick the trained ones)
            feats = [{k: rows[i][k] for k in rows[i] if k in keep} for i in idx]
            batch = {k: v.to(dev) for k, v in collate(feats).items()}
            top_ids, top_lp, tail, smp_ids, smp_lp = teacher_topk(
                teacher, kind, batch, top_k, tail_samples, gen
            )
            pos = 0
            for i in idx:
                n = int(lengths[i])
                sl = slice(int(offsets[i]), int(offsets[i]) + n)
                ids[sl] = top_ids[pos : pos + n].cpu().numpy().astype(ids_dtype)
                lps[sl] = stored_logprobs(top_lp[pos : pos + n].cpu(), logprob_dtype)
                tails[sl] = stored_logprobs(tail[pos : pos + n].cpu(), logprob_dtype)
                if tail_samples:
                    s_ids[sl] = smp_ids[pos : pos + n].cpu().numpy().astype(ids_dtype)
                    s_lps[sl] = stored_logprobs(smp_lp[pos : pos + n].cpu(), logprob_dtype)
                pos += n
            bar.update(len(idx))
        tokens = np.array([t for ts in targets for t in ts], dtype=ids_dtype)
        arrays = {"offsets": offsets, "tokens": tokens, "ids": ids, "logprobs": lps, "tail": tails}
        if tail_samples:
            arrays.update(sample_ids=s_ids, sample_logprobs=s_lps)
        write_shard(path, arrays)
        logger.info(
            "cache-logits: shard %d/%d (%d rows, %d positions) -> %s",
            shard + 1,
            n_shards,
            hi - lo,
            n_pos,
            path,
        )
    bar.close()
    size = sum(
        os.path.getsize(os.path.join(dp, f))
        for dp, _, fs in os.walk(output)
        for f in fs
        if dp != output
    )
    cache = LogitCache(output)
    return {
        "output": output,
        "rows": len(ds),
        "positions": cache.positions,
        "shards": n_shards,
        "shards_skipped": done,
        "top_k": top_k,
        "tail_samples": tail_samples,
        "bytes": size,
        "bytes_per_position": size / max(1, cache.positions),
        "truncation": {n["what"]: n for n in notes},
    }
