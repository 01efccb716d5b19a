"""Cached teacher logits: the teacher's top-K log-probabilities per target position, on disk.

``lmkd cache-logits`` runs the teacher once over the training data and stores, for every position
the KD loss uses (every target token of a seq2seq example; every next-token position of a causal
LM example), the teacher's K most probable token ids and their log-probabilities.  Training with
``DistillationConfig.logit_cache`` then needs no teacher in memory and no teacher forward.

**The mass outside the top-K: one tail bucket.**  For each position the cache also stores
``tail = log(1 - sum_k p_k)``, computed in float32 by the teacher as the log-sum-exp of all the
other log-probs (``-inf`` when the top-K holds all the mass).  The KD loss is then the divergence
between two distributions over K + 1 buckets -- the K token ids and "everything else" -- the
student's tail being the sum of its probabilities outside the K ids (:func:`lmkd.losses.chunked.topk_kd_loss`).
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
import logging
import os
import shutil
from dataclasses import asdict

import numpy as np
import torch

from lmkd.core.constants import CAUSAL, IGNORE_INDEX, SEQ2SEQ, TASK_KIND
from lmkd.core.errors import LmkdError
from lmkd.core.io import atomic_write_json, check_output, replace_dir
from lmkd.losses import TopK
from lmkd.models.loop_rules import longest_first

logger = logging.getLogger(__name__)

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
    """The numpy dtype a cache stores token ids of a ``vocab``-sized vocabulary in (uint16 when it fits)."""
    return np.uint16 if vocab <= 65536 else np.int32


def _targets(row: dict, kind: str) -> list[int]:
    """The token predicted at each KD position of one tokenised example."""
    if kind == SEQ2SEQ:
        return [int(t) for t in row["labels"]]
    if kind == CAUSAL:
        return [int(t) for t in row["input_ids"][1:]]
    raise LmkdError(
        f"cached teacher logits support seq2seq and causal LMs, not {kind} models; "
        "use the online teacher (no logit_cache)"
    )


def _lp_to_numpy(lp: torch.Tensor, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return lp.to(torch.bfloat16).view(torch.uint16).numpy()
    return lp.to(getattr(torch, dtype)).numpy()


def _lp_from_numpy(arr: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.array(arr))  # a copy: the shards are read-only memory maps
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


# ---- writing ----------------------------------------------------------------------------------


@torch.inference_mode()
def teacher_topk(teacher, kind, batch, top_k, tail_samples=0, generator=None):
    """(ids, logprobs, tail, sample ids, sample logprobs) per KD position of a padded batch, rows
    in order, positions in order; ``tail_samples`` ids per position drawn with replacement from
    the teacher's distribution outside its top-K (None when 0)."""
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
    replaces ``path`` once complete, so an interrupted run leaves no half-written shard."""
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
    the module docstring), reproducibly from ``seed``.  Inputs and targets are truncated by the one
    rule (:func:`lmkd.models.truncation.fit_length`) to the teacher's tables; training on the cache applies
    the same rule with the same teacher (:func:`cache_teacher`).  Returns a summary dict (with
    ``truncation``: the rows cut, :func:`lmkd.models.truncation.truncation_note`).  A tqdm bar counts the
    rows the teacher has read (``progress``: None shows it on a terminal only, as tqdm decides).
    """
    from tqdm.auto import tqdm
    from transformers import DataCollatorForSeq2Seq

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
        targets = [_targets(r, kind) for r in rows]
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
            feats = [
                {k: rows[i][k] for k in rows[i] if k in ("input_ids", "attention_mask", "labels")}
                for i in idx
            ]
            batch = {k: v.to(dev) for k, v in collate(feats).items()}
            top_ids, top_lp, tail, smp_ids, smp_lp = teacher_topk(
                teacher, kind, batch, top_k, tail_samples, gen
            )
            pos = 0
            for i in idx:
                n = int(lengths[i])
                sl = slice(int(offsets[i]), int(offsets[i]) + n)
                ids[sl] = top_ids[pos : pos + n].cpu().numpy().astype(ids_dtype)
                lps[sl] = _lp_to_numpy(top_lp[pos : pos + n].cpu(), logprob_dtype)
                tails[sl] = _lp_to_numpy(tail[pos : pos + n].cpu(), logprob_dtype)
                if tail_samples:
                    s_ids[sl] = smp_ids[pos : pos + n].cpu().numpy().astype(ids_dtype)
                    s_lps[sl] = _lp_to_numpy(smp_lp[pos : pos + n].cpu(), logprob_dtype)
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


# ---- reading ----------------------------------------------------------------------------------


def cache_teacher(path: str) -> str | None:
    """The teacher directory a cache was made with, when it is still there (its position tables
    decide how the cached data were truncated); None otherwise."""
    meta_path = os.path.join(path, "meta.json")
    if not os.path.isfile(meta_path):
        return None
    with open(meta_path) as f:
        teacher = json.load(f).get("teacher")
    return teacher if teacher and os.path.isfile(os.path.join(teacher, "config.json")) else None


class LogitCache:
    """A cache directory opened for reading: shards memory-mapped, rows looked up by number."""

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
        """(tokens, ids, logprobs, tail) numpy views of data row ``i``."""
        s, sl = self._where(i)
        return s["tokens"][sl], s["ids"][sl], s["logprobs"][sl], s["tail"][sl]

    def samples(self, i: int):
        """(sample ids, sample logprobs) numpy views of data row ``i`` (a cache with tail samples)."""
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
    row that it is tokenised exactly as the cache was (same rows, same target tokens)."""
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
        if _targets(row, kind) != tokens.tolist():
            raise LmkdError(
                f"row {i} of the {what} data is tokenised differently from the logit cache "
                f"{cache.path}; use the same file, tokenizer, max lengths and prefix as `lmkd "
                "cache-logits` did"
            )
    return ds.add_column(CACHE_ROW, list(range(len(ds))))


class CachedLogitsCollator:
    """Wraps a collator: pops :data:`CACHE_ROW` from each example and adds the cached top-K of the
    batch as ``(B, P, K)`` tensors aligned with the KD positions (the logits' leading shape after
    the causal shift), padded on the tokenizer's side, plus a ``(B, P)`` mask of cached positions."""

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
    """The cached teacher of a batch at the KD positions (flattened, in order)."""
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
