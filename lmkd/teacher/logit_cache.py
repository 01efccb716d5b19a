"""Cached teacher logits: the teacher's top-K log-probabilities per target position, on disk.

``lmkd cache-logits`` runs the teacher once over the training data and stores, for every position
the KD loss uses (every target token of a seq2seq example; every next-token position of a causal
LM example), the teacher's K most probable token ids and their log-probabilities
(:mod:`lmkd.teacher.logit_cache_writer`).  Training with ``DistillationConfig.logit_cache`` then
needs no teacher in memory and no teacher forward: this module reads the cache back.

**The mass outside the top-K: one tail bucket.**  For each position the cache also stores
``tail = log(1 - sum_k p_k)``, computed in float32 by the teacher as the log-sum-exp of all the
other log-probs (``-inf`` when the top-K holds all the mass).  The KD loss is then the divergence
between two distributions over K + 1 buckets -- the K token ids and "everything else" -- the
student's tail being the sum of its probabilities outside the K ids (:func:`lmkd.losses.topk.topk_kd_loss`).
Why not renormalise the top-K (as several toolkits do): renormalising tells the student that the
teacher puts zero mass outside the top-K, so it pushes the student's tail mass towards 0 and
inflates the top-K probabilities by ``1 / sum_k p_k`` -- a different, sharper target whenever
the teacher is uncertain.  The tail bucket keeps the teacher's total probabilities exact (the KL
of the bucketed distributions is a lower bound of the full KL, reached when the student's tail
is shaped like the teacher's), and with K = V it is exactly the full-vocabulary loss.  The tail
is stored rather than derived from ``1 - sum exp(logprob)`` because the stored log-probs are
rounded to 16 bits: the derived tail would be pure rounding noise when the top-K holds ~all mass.
Temperature: the K + 1 teacher buckets are tempered as K + 1 logits ``log p / tau``.

**Optionally, a sampled tail** (``--tail-samples M``).  The bucket leaves the *shape* of the
student's tail free: for tail tokens its forward-KL gradient is ``p_s,j (1 - P_t,tail / P_s,tail)``
instead of ``p_s,j - p_t,j``, a bias that does not average out over steps, and an uncertain
teacher's tail is large (on the shipped en->fr data the demo teacher's top-32 leaves ~10% of the
mass outside).  With M > 0 the cache also stores, per position, M token ids drawn with
replacement from the teacher's distribution renormalised outside the top-K, with their
log-probs.  For the forward KL each draw then stands for ``P_tail / M`` of the teacher's mass: the
K exact probabilities plus the draws, scattered over the vocabulary, are an unbiased estimate of
the teacher's distribution, so the gradient ``p_s - q`` is unbiased for the full-vocabulary one
(the "random-sampling KD" idea of Anshumann et al., 2025, on top of an exact top-K).  At
``tau != 1`` the tempered tail mass is estimated by importance sampling and all K + M entries are
normalised together (consistent, slightly biased for small M).  Reverse KL and JSD need the
teacher's probability wherever the student puts mass, so they keep using the bucket.  Draws are
made from a generator seeded by ``(seed, shard)``: a resumed cache is byte-identical.

**Layout** of ``DIR``: ``meta.json`` (settings, row count, vocabulary, dtypes) and one directory
per shard of ``shard_rows`` consecutive data rows, ``shard-00000/`` ..., each holding ``.npy``
arrays (memory-mapped when training): ``offsets`` (rows + 1, int64: the positions of row i are
``offsets[i]:offsets[i+1]``), ``tokens`` (the target token at each position: checks that the
training data is tokenised as the cache was), ``ids`` (positions x K), ``logprobs``
(positions x K), ``tail`` (positions), and with tail samples ``sample_ids`` and
``sample_logprobs`` (positions x M).  Ids and tokens are uint16 when the vocabulary fits, else
int32; log-probs float16 (default), bfloat16 (stored as its uint16 bits) or float32.  Bytes per
position: ``(K + M) * (2 or 4) + (K + M) * 2 + (2 or 4) + 2 <= 6(K + M) + 6`` plus a 128-byte
header per array.

**Resumable**: a shard is written to a temporary directory and renamed when complete; a rerun
with the same settings skips the shards that exist, so an interrupted run loses at most one shard.
Shards are deterministic (fixed rows per shard, fixed batching), so a resumed cache is
byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from lmkd.core.constants import CAUSAL, SEQ2SEQ
from lmkd.core.errors import LmkdError
from lmkd.losses import TopK

FORMAT_VERSION = 1
#: the dataset column carrying each example's row number in the cache
CACHE_ROW = "logit_cache_row"
#: batch keys added by :class:`CachedLogitsCollator` (the model never sees them)
IDS, LOGPROBS, TAIL, MASK = (
    "teacher_topk_ids",
    "teacher_topk_logprobs",
    "teacher_topk_tail",
    "teacher_topk_mask",
)
SAMPLE_IDS, SAMPLE_LOGPROBS = "teacher_sample_ids", "teacher_sample_logprobs"
BATCH_KEYS = (IDS, LOGPROBS, TAIL, MASK, SAMPLE_IDS, SAMPLE_LOGPROBS)
LOGPROB_DTYPES = ("float16", "bfloat16", "float32")
ARRAYS = ("offsets", "tokens", "ids", "logprobs", "tail")
#: written only by a cache with tail samples (``--tail-samples M``)
SAMPLE_ARRAYS = ("sample_ids", "sample_logprobs")


def id_dtype(vocab: int):
    """The numpy dtype a cache stores token ids of a ``vocab``-sized vocabulary in (uint16 when it
    fits).

    Args:
        vocab: the vocabulary size.

    Returns:
        ``np.uint16`` for at most 65536 ids, else ``np.int32``.
    """
    return np.uint16 if vocab <= 65536 else np.int32


def targets(row: dict, kind: str) -> list[int]:
    """The token predicted at each KD position of one tokenised example.

    Args:
        row: the tokenised example (``labels`` for seq2seq, ``input_ids`` for a causal LM).
        kind: the model kind (seq2seq or causal).

    Returns:
        The target token ids, one per KD position, in order.
    """
    if kind == SEQ2SEQ:
        return [int(t) for t in row["labels"]]
    if kind == CAUSAL:
        return [int(t) for t in row["input_ids"][1:]]
    raise LmkdError(
        f"cached teacher logits support seq2seq and causal LMs, not {kind} models; "
        "use the online teacher (no logit_cache)"
    )


def stored_logprobs(lp: torch.Tensor, dtype: str) -> np.ndarray:
    """Log-probs as a cache stores them (and ``lmkd serve-teacher``'s binary answer sends them):
    rounded to ``dtype`` by torch, bfloat16 as its uint16 bits (numpy has no bfloat16).

    Args:
        lp: float32 log-probs (on the CPU).
        dtype: one of :data:`LOGPROB_DTYPES`.

    Returns:
        The numpy array (float16, uint16 bits of bfloat16, or float32).
    """
    if dtype == "bfloat16":
        return lp.to(torch.bfloat16).view(torch.uint16).numpy()
    return lp.to(getattr(torch, dtype)).numpy()


def _lp_from_numpy(arr: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.array(arr))  # a copy: the shards are read-only memory maps
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


# ---- reading ----------------------------------------------------------------------------------


def cache_teacher(path: str) -> str | None:
    """The teacher directory a cache was made with, when it is still there (its position tables
    decide how the cached data were truncated); None otherwise.

    Args:
        path: the cache directory.

    Returns:
        The teacher's directory (it has a ``config.json``), or None.
    """
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path) as f:
        teacher = json.load(f).get("teacher")
    return teacher if teacher and os.path.isfile(os.path.join(teacher, "config.json")) else None


class LogitCache:
    """A cache directory opened for reading: shards memory-mapped, rows looked up by number.

    Args:
        path: the cache directory written by ``lmkd cache-logits``.

    Raises:
        LmkdError: ``path`` has no ``meta.json``, is of another format version, or lacks a shard
            (an unfinished cache).
    """

    def __init__(self, path: str):
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            raise LmkdError(
                f"{path} is not a logit cache (no meta.json); write one with `lmkd cache-logits`"
            )
        with open(meta_path) as f:
            self.meta = json.load(f)
        if self.meta.get("format") != FORMAT_VERSION:
            raise LmkdError(
                f"{path} is a logit cache of format {self.meta.get('format')}; this lmkd reads "
                f"format {FORMAT_VERSION}: write it again with `lmkd cache-logits`"
            )
        self.path = path
        self.rows = self.meta["rows"]
        self.shard_rows = self.meta["shard_rows"]
        self.top_k = self.meta["top_k"]
        self.kind = self.meta["kind"]
        self.lp_dtype = self.meta["logprob_dtype"]
        self.tail_samples = int(self.meta.get("tail_samples", 0))
        n_shards = (self.rows + self.shard_rows - 1) // self.shard_rows
        self.shards = []
        for s in range(n_shards):
            d = os.path.join(path, f"shard-{s:05d}")
            if not os.path.isdir(d):
                raise LmkdError(
                    f"logit cache {path} is incomplete (no {os.path.basename(d)}); rerun the same "
                    "`lmkd cache-logits` command to finish it"
                )
            names = ARRAYS + (SAMPLE_ARRAYS if self.tail_samples else ())
            self.shards.append(
                {a: np.load(os.path.join(d, a + ".npy"), mmap_mode="r") for a in names}
            )
        self.positions = sum(int(s["offsets"][-1]) for s in self.shards)

    def row(self, i: int):
        """(tokens, ids, logprobs, tail) numpy views of data row ``i``.

        Args:
            i: the data row's number.

        Returns:
            The row's target tokens ``(P,)``, top-K ids and log-probs ``(P, K)`` and tail mass
            ``(P,)``.
        """
        s, sl = self._where(i)
        return s["tokens"][sl], s["ids"][sl], s["logprobs"][sl], s["tail"][sl]

    def samples(self, i: int):
        """(sample ids, sample logprobs) numpy views of data row ``i`` (a cache with tail samples).

        Args:
            i: the data row's number.

        Returns:
            The row's sampled tail ids and their log-probs, ``(P, M)`` each.
        """
        s, sl = self._where(i)
        return s["sample_ids"][sl], s["sample_logprobs"][sl]

    def _where(self, i: int):
        if not 0 <= i < self.rows:
            raise IndexError(i)
        s = self.shards[i // self.shard_rows]
        j = i % self.shard_rows
        return s, slice(int(s["offsets"][j]), int(s["offsets"][j + 1]))


def attach_cache(ds, cache: LogitCache | str, kind: str, what: str = "training"):
    """``ds`` (the tokenised training data) with a :data:`CACHE_ROW` column, after checking row by
    row that it is tokenised exactly as the cache was (same rows, same target tokens).

    Args:
        ds: the tokenised rows (returned as they are when they already have the column).
        cache: the cache, or its directory.
        kind: the student's model kind.
        what: ``training`` or ``validation``, for the errors.

    Returns:
        ``ds`` with each row's cache row number.

    Raises:
        LmkdError: the cache was made for another kind, the row counts differ, or a row is
            tokenised differently.
    """
    if isinstance(cache, str):
        cache = LogitCache(cache)
    if cache.kind != kind:
        raise LmkdError(
            f"the logit cache {cache.path} was made for a {cache.kind} teacher but the student is "
            f"a {kind} model"
        )
    if CACHE_ROW in ds.column_names:
        return ds
    if len(ds) != cache.rows:
        raise LmkdError(
            f"the {what} data has {len(ds)} rows but the logit cache {cache.path} has {cache.rows}; "
            f"use the same file (and max_{'eval' if what == 'validation' else 'train'}_samples) the "
            "cache was made from"
        )
    for i, row in enumerate(ds):
        tokens = cache.row(i)[0]
        if targets(row, kind) != tokens.tolist():
            raise LmkdError(
                f"row {i} of the {what} data is tokenised differently from the logit cache "
                f"{cache.path}; use the same file, tokenizer, max lengths and prefix as `lmkd "
                "cache-logits` did"
            )
    return ds.add_column(CACHE_ROW, list(range(len(ds))))


class CachedLogitsCollator:
    """Wraps a collator: pops :data:`CACHE_ROW` from each example and adds the cached top-K of the
    batch as ``(B, P, K)`` tensors aligned with the KD positions (the logits' leading shape after
    the causal shift), padded on the tokenizer's side, plus a ``(B, P)`` mask of cached positions.

    A batch with an example lacking :data:`CACHE_ROW` is collated as it is.

    Args:
        collator: the run's collator.
        cache: the cache, or its directory.
        padding_side: the side the collator pads on (``right`` or ``left``).
    """

    def __init__(self, collator, cache: LogitCache | str, padding_side: str = "right"):
        self.collator = collator
        self.cache = LogitCache(cache) if isinstance(cache, str) else cache
        self.padding_side = padding_side

    def __call__(self, features):
        rows = [f.pop(CACHE_ROW, None) if isinstance(f, dict) else None for f in features]
        batch = self.collator(features)
        if any(r is None for r in rows):
            return batch
        if self.cache.kind == SEQ2SEQ:
            p = batch["labels"].shape[1]
        else:
            p = batch["input_ids"].shape[1] - 1
        b, k = len(rows), self.cache.top_k
        ids = torch.zeros((b, p, k), dtype=torch.int64)
        lp = torch.zeros(
            (b, p, k),
            dtype=torch.bfloat16
            if self.cache.lp_dtype == "bfloat16"
            else getattr(torch, self.cache.lp_dtype),
        )
        tail = torch.zeros((b, p), dtype=lp.dtype)
        mask = torch.zeros((b, p), dtype=torch.bool)
        m = self.cache.tail_samples
        s_ids = torch.zeros((b, p, m), dtype=torch.int64)
        s_lp = torch.zeros((b, p, m), dtype=lp.dtype)
        for i, r in enumerate(rows):
            _, r_ids, r_lp, r_tail = self.cache.row(int(r))
            n = min(len(r_ids), p)
            sl = slice(0, n) if self.padding_side == "right" else slice(p - n, p)
            ids[i, sl] = torch.from_numpy(r_ids[:n].astype(np.int64))
            lp[i, sl] = _lp_from_numpy(r_lp[:n], self.cache.lp_dtype)
            tail[i, sl] = _lp_from_numpy(r_tail[:n], self.cache.lp_dtype)
            mask[i, sl] = True
            if m:
                r_sids, r_slp = self.cache.samples(int(r))
                s_ids[i, sl] = torch.from_numpy(r_sids[:n].astype(np.int64))
                s_lp[i, sl] = _lp_from_numpy(r_slp[:n], self.cache.lp_dtype)
        batch[IDS], batch[LOGPROBS], batch[TAIL], batch[MASK] = ids, lp, tail, mask
        if m:
            batch[SAMPLE_IDS], batch[SAMPLE_LOGPROBS] = s_ids, s_lp
        return batch


def batch_topk(inputs: dict, kd_mask: torch.Tensor) -> TopK:
    """The cached teacher of a batch at the KD positions (flattened, in order).

    Args:
        inputs: the batch, with the keys :class:`CachedLogitsCollator` adds.
        kd_mask: ``(B, P)`` KD positions.

    Returns:
        A :class:`lmkd.losses.TopK` of the ids, log-probs, tail and (if cached) tail samples.

    Raises:
        LmkdError: the cache does not cover every KD position.
    """
    cached = inputs[MASK]
    if cached.shape != kd_mask.shape or bool((kd_mask & ~cached).any()):
        raise LmkdError(
            "the logit cache does not cover every KD position of this batch (truncated or "
            "differently padded data); make the cache from the same data and settings"
        )
    return TopK(
        *(
            inputs[k][kd_mask] if k in inputs else None
            for k in (IDS, LOGPROBS, TAIL, SAMPLE_IDS, SAMPLE_LOGPROBS)
        )
    )
