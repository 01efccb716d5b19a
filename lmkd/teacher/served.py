"""A teacher served over HTTP: its top-k log-probs per position, asked for each batch.

``teacher_server_url`` (with ``teacher_server``: lmkd, vllm or sglang) replaces the in-process
teacher: for each batch the client (:class:`ServedTeacher`) asks the server for the teacher's top-k
log-probs at every KD position (:mod:`lmkd.teacher.served_protocol` has the three wire formats; an
lmkd server is asked its binary answer, stored as a logit cache stores the same rows) and
:func:`served_batch` turns the answer into exactly the tensors a logit-cache row gives
(:data:`lmkd.teacher.logit_cache.IDS`, ``LOGPROBS``, ``TAIL``, ``MASK``), so the KD loss is the
cached top-K path's (:func:`lmkd.teacher.logit_cache.batch_topk`, :mod:`lmkd.losses.topk`): one code
path, one objective.  With ``teacher_tokenizer`` (cross-tokenizer KD) the server is asked at the
teacher's own tokens, which the collator added to the batch, and each student KD position gets the
answer at its aligned teacher position; the objective rebuilds the teacher's distribution from it for
the cross-tokenizer loss.  The log-probs are rounded to ``logprob_dtype`` (``teacher_logprob_dtype``,
float16 by default as ``lmkd cache-logits`` stores them) whichever server sent them: an lmkd server
rounds them before sending, the JSON numbers of vLLM and SGLang are rounded here.

:class:`Prefetcher` asks for the next batches while the current one trains: a bounded queue of
batches, each with its request running in a small thread pool, handed out in order.  Each request
carries its batch's own token ids and its answer travels with that batch, so answers are keyed by
example, never by step number (a resumed run asks again for the batches it trains).

Faults: :meth:`ServedTeacher.check` (before any work) refuses an unreachable server, one of another
vocabulary or tokenizer, in one line; a timeout or dropped connection mid-run is retried with
exponential back-off (:data:`RETRIES` tries, from :data:`BACKOFF_S` seconds, doubling), then
:class:`TeacherServerDown` is raised, which the trainer turns into a checkpoint and a stop that
``--resume`` continues (:mod:`lmkd.train.served_steps`).
"""

from __future__ import annotations

import collections
import http.client
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from lmkd.core.constants import CAUSAL, IGNORE_INDEX, SEQ2SEQ
from lmkd.core.errors import LmkdError
from lmkd.data.tokenizing import TEACHER_ID
from lmkd.teacher import cross_tokenizer, logit_cache
from lmkd.teacher.served_protocol import (
    BINARY_TYPE,
    PROTOCOL,
    SERVERS,
    parse_answer,
    refusal_line,
    request_for,
    tokenizer_fingerprint,
)

logger = logging.getLogger(__name__)

#: tries of a request before the run stops (a timeout or a dropped connection)
RETRIES = 5
#: the first back-off, doubled after each failed try (0.5 + 1 + 2 + 4 s before the last try)
BACKOFF_S = 0.5
#: a probe text whose tokens are compared with the server's (vLLM and SGLang have no /info)
PROBE_TEXT = "Knowledge distillation: a student learns from its teacher, 42 times."


class TeacherServerDown(LmkdError):
    """The teacher server stopped answering (after :data:`RETRIES` tries).

    Args:
        *args: the message (one line).
    """


class ServedTeacher:
    """Client of a teacher server.

    Args:
        url: the server's base URL, e.g. ``http://gpu-box:8000``.
        server: the protocol, one of :data:`lmkd.teacher.served_protocol.SERVERS`.
        top_k: log-probs asked per position.
        timeout: seconds to wait for one answer.
        retries: tries of a request before :class:`TeacherServerDown`.
        backoff: the first back-off in seconds (doubled after each failed try).
        logprob_dtype: the teacher's log-probs and tail rounded to (float16, bfloat16, float32):
            what an lmkd server sends, in its binary answer; the others' answers are rounded here.
    """

    def __init__(
        self,
        url: str,
        server: str = "lmkd",
        top_k: int = 20,
        timeout: float = 60.0,
        retries: int | None = None,
        backoff: float | None = None,
        logprob_dtype: str = "float16",
    ):
        if server not in SERVERS:
            raise LmkdError(
                f"unknown teacher_server {server!r}; choose one of {', '.join(SERVERS)}"
            )
        if logprob_dtype not in logit_cache.LOGPROB_DTYPES:
            raise LmkdError(
                f"unknown teacher_logprob_dtype {logprob_dtype!r}; choose one of "
                f"{', '.join(logit_cache.LOGPROB_DTYPES)}"
            )
        self.url, self.server, self.top_k, self.timeout = url.rstrip("/"), server, top_k, timeout
        self.logprob_dtype = logprob_dtype
        self.binary = server == "lmkd"  # ask lmkd's binary answer (off for a server without it)
        self.retries = RETRIES if retries is None else retries
        self.backoff = BACKOFF_S if backoff is None else backoff
        self.model: str | None = None  # vLLM's served model name, from /v1/models
        self.info: dict = {}
        # checked against teacher_tokenizer (cross-tokenizer KD), not the student's
        self.cross = False
        self.bytes_received = 0  # answer bytes, for the benchmark
        self.positions_received = 0

    # ---- HTTP ----------------------------------------------------------------------------------

    def _http(self, path: str, body: dict | None, timeout: float) -> tuple[str, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.headers.get("Content-Type", ""), r.read()

    def call(self, path: str, body: dict | None = None, retries: int | None = None):
        """One request, retried with exponential back-off on a timeout or dropped connection.

        Args:
            path: the path under the URL.
            body: the JSON body (None: a GET).
            retries: tries (None: :attr:`retries`).

        Returns:
            The decoded JSON answer, or the body of a binary answer (bytes).

        Raises:
            LmkdError: the server refused the request (HTTP 4xx), in one line.
            TeacherServerDown: no answer after the tries.
        """
        tries = self.retries if retries is None else retries
        wait, last = self.backoff, None
        for attempt in range(max(tries, 1)):
            try:
                kind, raw = self._http(path, body, self.timeout)
                self.bytes_received += len(raw)
                return raw if kind.startswith(BINARY_TYPE) else json.loads(raw)
            except urllib.error.HTTPError as e:
                text = e.read().decode(errors="replace")
                if e.code < 500:
                    raise LmkdError(refusal_line(self.server, e.code, text, self.top_k)) from None
                last = f"HTTP {e.code}: {' '.join(text.split())[:200]}"
            except (
                urllib.error.URLError,
                http.client.HTTPException,
                ConnectionError,
                socket.timeout,
                TimeoutError,
                json.JSONDecodeError,
            ) as e:
                last = str(getattr(e, "reason", e)) or type(e).__name__
            if attempt + 1 < tries:
                logger.warning(
                    "teacher server %s: %s; trying again in %.1f s (%d/%d)",
                    self.url,
                    last,
                    wait,
                    attempt + 1,
                    tries,
                )
                time.sleep(wait)
                wait *= 2
        raise TeacherServerDown(
            f"the teacher server at {self.url} did not answer {path} after {tries} tries ({last})"
        )

    # ---- the check before any work -------------------------------------------------------------

    def check(self, tokenizer, vocab: int | None, cross: bool = False) -> None:
        """Refuse, in one line, a server that is not there or serves another vocabulary.

        lmkd: ``/info``'s vocabulary size and tokenizer fingerprint against the student's; vLLM:
        ``/v1/models`` (the model name) and ``/tokenize`` of a probe text; SGLang:
        ``/get_model_info`` and the probe's tokens as ``/generate`` echoes them.

        Args:
            tokenizer: the student's tokenizer (None: not checked); with ``cross``, the
                ``teacher_tokenizer``.
            vocab: the student's output size (None: not checked).
            cross: cross-tokenizer KD: ``tokenizer`` is the ``teacher_tokenizer`` the server's
                must be (the lines say so).

        Raises:
            LmkdError: no server, a server of another protocol, vocabulary or tokenizer.
        """
        self.cross = cross
        try:
            if self.server == "lmkd":
                self.info = self.call("/info", retries=1)
                self._check_lmkd(tokenizer, vocab)
            elif self.server == "vllm":
                models = self.call("/v1/models", retries=1)
                self.model = models["data"][0]["id"]
                self.info = {
                    "model": self.model,
                    "max_positions": models["data"][0].get("max_model_len"),
                }
                if tokenizer is not None:
                    got = self.call(
                        "/tokenize", {"model": self.model, "prompt": PROBE_TEXT}, retries=1
                    )["tokens"]
                    self._check_probe(tokenizer, got)
            else:
                self.info = self.call("/get_model_info", retries=1)
                if tokenizer is not None:
                    ids = tokenizer(PROBE_TEXT)["input_ids"]
                    ans = self.call(
                        "/generate",
                        {
                            "text": PROBE_TEXT,
                            "sampling_params": {"max_new_tokens": 1},
                            "return_logprob": True,
                            "logprob_start_len": 0,
                        },
                        retries=1,
                    )
                    got = [int(e[1]) for e in ans["meta_info"]["input_token_logprobs"]]
                    self._check_probe(tokenizer, got, ids)
        except TeacherServerDown as e:
            raise LmkdError(
                f"no teacher server answers at {self.url} ({str(e).rsplit('(', 1)[-1].rstrip(')')}); "
                f"start it first (e.g. `lmkd serve-teacher MODEL --port N`, docs/served-teacher.md) "
                "or fix teacher_server_url"
            ) from None
        except (KeyError, IndexError, TypeError) as e:
            raise LmkdError(
                f"the server at {self.url} does not speak the {self.server} protocol "
                f"({type(e).__name__}: {e}); check teacher_server"
            ) from None

    def _check_lmkd(self, tokenizer, vocab) -> None:
        info = self.info
        if info.get("protocol") != PROTOCOL:
            raise LmkdError(
                f"the server at {self.url} speaks {info.get('protocol')!r}, not {PROTOCOL}; "
                "start `lmkd serve-teacher` of this lmkd, or set teacher_server vllm/sglang"
            )
        if tokenizer is not None and info["tokenizer"] != tokenizer_fingerprint(tokenizer):
            raise LmkdError(
                f"the teacher served at {self.url} ({info.get('model')}) has another tokenizer "
                f"(vocabulary fingerprint {info['tokenizer']}, {self._whose()} "
                f"{tokenizer_fingerprint(tokenizer)}); {self._fix()}"
            )
        if "binary" not in info.get("encodings", ()):
            self.binary = False
            logger.warning(
                "the teacher server at %s answers in JSON only (an older lmkd serve-teacher): int32 "
                "ids and float32 log-probs in base64, about 2.7x the bytes of the binary answer "
                "at float16; the log-probs are rounded to %s here",
                self.url,
                self.logprob_dtype,
            )
        if vocab is not None and int(info["vocab_size"]) != vocab:
            if tokenizer is None or len(tokenizer) > min(int(info["vocab_size"]), vocab):
                raise LmkdError(
                    f"the teacher served at {self.url} has {info['vocab_size']} output rows but the "
                    f"student {vocab}; serve a teacher of the student's vocabulary"
                )

    def _whose(self) -> str:
        return "teacher_tokenizer's" if self.cross else "the student's"

    def _fix(self) -> str:
        if self.cross:
            return "set teacher_tokenizer to the served teacher's tokenizer"
        return "serve a teacher of the student's tokenizer"

    def _check_probe(self, tokenizer, got, ids=None) -> None:
        want = tokenizer(PROBE_TEXT)["input_ids"] if ids is None else ids
        if [int(t) for t in got] != [int(t) for t in want]:
            raise LmkdError(
                f"the teacher served at {self.url} tokenises a probe text differently from "
                f"{'teacher_tokenizer' if self.cross else 'the student'} "
                f"({list(got)[:8]}... vs {list(want)[:8]}...): another tokenizer; {self._fix()}"
            )

    # ---- scoring -------------------------------------------------------------------------------

    def score(self, rows: list[dict]) -> list[tuple]:
        """The teacher's top-k at every position of each row.

        Args:
            rows: ``{"input_ids": [...]}`` per row (+ ``labels`` for a seq2seq teacher).

        Returns:
            Per row ``(ids (n, k), logprobs (n, k), tail (n,))`` numpy arrays (log-probs float32:
            a binary answer's values widened exactly; :func:`served_batch` rounds them).
        """
        dtype = self.logprob_dtype if self.binary else None
        path, body = request_for(self.server, rows, self.top_k, self.model, dtype)
        out = parse_answer(self.server, self.call(path, body), rows, self.top_k)
        self.positions_received += sum(len(r[0]) for r in out)
        return out


def _rows_of(batch: dict, kind: str) -> tuple[list[dict], list, int]:
    """The rows to ask for, per row the positions (in the shifted KD layout) they fill, and that
    layout's width."""
    ids = batch["input_ids"]
    att = batch.get("attention_mask")
    att = torch.ones_like(ids) if att is None else att
    rows, where = [], []
    for b in range(ids.shape[0]):
        keep = att[b].bool()
        row = {"input_ids": ids[b][keep].tolist()}
        if kind == SEQ2SEQ:
            lab = batch["labels"][b]
            real = (lab != IGNORE_INDEX).nonzero().flatten()
            lo, hi = (int(real[0]), int(real[-1]) + 1) if len(real) else (0, 0)
            row["labels"] = lab[lo:hi].tolist()
            where.append(torch.arange(lo, hi))
        else:
            where.append(keep.nonzero().flatten()[:-1].cpu())  # logits at j predict token j + 1
        rows.append(row)
    width = batch["labels"].shape[1] if kind == SEQ2SEQ else ids.shape[1] - 1
    return rows, where, width


def _teacher_rows_of(batch: dict, kind: str) -> tuple[list, list, int]:
    """:func:`_rows_of` of a cross-tokenizer batch (``teacher_tokenizer``): the teacher's own tokens
    (:mod:`lmkd.teacher.cross_tokenizer`'s keys), positions in the teacher's layout -- a causal
    teacher's position ``j`` is its distribution after reading its tokens ``0..j`` (the unshifted
    logits at ``j``), a seq2seq teacher's one per teacher label.  A causal row is sent with its last
    token repeated, so that the answer also holds the distribution after the last real token (a
    student position can align with it); a causal LM's earlier positions do not see the extra
    token.  Rows with no aligned position are not asked (None)."""
    t_ids = batch[cross_tokenizer.TEACHER_INPUT_IDS].cpu()
    t_att = batch[cross_tokenizer.TEACHER_ATTENTION_MASK].cpu().bool()
    aligned = batch[cross_tokenizer.TEACHER_POSITION].cpu().ge(0).any(-1)
    rows, where = [], []
    for b in range(t_ids.shape[0]):
        source = t_ids[b][t_att[b]].tolist()
        if kind == SEQ2SEQ:
            lab = batch[cross_tokenizer.TEACHER_LABELS][b].cpu()
            real = (lab != IGNORE_INDEX).nonzero().flatten()
            lo, hi = (int(real[0]), int(real[-1]) + 1) if len(real) else (0, 0)
            row = {"input_ids": source, "labels": lab[lo:hi].tolist()}
            pos = torch.arange(lo, hi)
        else:
            row = {"input_ids": source + source[-1:]}
            pos = torch.arange(len(source))
        ok = bool(aligned[b]) and len(pos) > 0
        rows.append(row if ok else None)
        where.append(pos if ok else pos[:0])
    width = batch[cross_tokenizer.TEACHER_LABELS].shape[1] if kind == SEQ2SEQ else t_ids.shape[1]
    return rows, where, width


def _at_student_positions(keys: dict, batch: dict, kind: str) -> dict:
    """Answer tensors in the teacher's layout -> at each student KD position, the teacher position
    it is aligned with (:data:`lmkd.teacher.cross_tokenizer.TEACHER_POSITION`; unaligned: masked)."""
    pos = batch[cross_tokenizer.TEACHER_POSITION].cpu()
    pos = pos[:, :-1] if kind == CAUSAL else pos  # a causal student's KD positions: shifted
    at = pos.clamp(min=0)
    out = {}
    for key, t in keys.items():
        index = at.unsqueeze(-1).expand(-1, -1, t.shape[-1]) if t.dim() == 3 else at
        out[key] = t.gather(1, index)
    out[logit_cache.MASK] = out[logit_cache.MASK] & pos.ge(0)
    return out


def served_batch(teacher, batch: dict, kind: str) -> dict:
    """The served teacher's answer for a collated batch, as the tensors a logit-cache row gives:
    ``(B, P, K)`` ids and log-probs, ``(B, P)`` tail and mask of answered positions, aligned with
    the KD positions (the logits' leading shape after the causal shift); log-probs and tail in the
    client's ``logprob_dtype``, as a logit cache of that dtype gives them.

    A cross-tokenizer batch (``teacher_tokenizer``: the keys of
    :class:`lmkd.teacher.cross_tokenizer.CrossTokenizerCollator`) is asked with the teacher's own
    tokens, and each student KD position gets the answer at its aligned teacher position (ids in
    the teacher's vocabulary); a position aligned with none is masked.

    Args:
        teacher: the client, or several: each row then goes to the one its
            :data:`lmkd.data.tokenizing.TEACHER_ID` names (all must ask the same k and dtype).
        batch: the collated batch (``input_ids``, ``attention_mask``; ``labels`` for seq2seq).
        kind: the model kind (causal or seq2seq).

    Returns:
        The batch keys :data:`lmkd.teacher.logit_cache.IDS`, ``LOGPROBS``, ``TAIL``, ``MASK``.

    Raises:
        LmkdError: a model kind a served teacher does not score, or a row routed to no server.
    """
    if kind not in (CAUSAL, SEQ2SEQ):
        raise LmkdError(f"a served teacher scores causal and seq2seq LMs, not {kind} models")
    teachers = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
    cross = cross_tokenizer.TEACHER_POSITION in batch
    rows, where, p = (_teacher_rows_of if cross else _rows_of)(batch, kind)
    route = [0] * len(rows)
    if len(teachers) > 1:
        if TEACHER_ID not in batch:
            raise LmkdError(
                f"teacher_server_url lists {len(teachers)} servers: give the data a {TEACHER_ID} "
                "column (each row's server, counted from 0)"
            )
        route = [int(t) for t in batch[TEACHER_ID]]
        bad = [t for t in route if not 0 <= t < len(teachers)]
        if bad:
            raise LmkdError(
                f"{TEACHER_ID} {bad[0]} names no server: teacher_server_url lists "
                f"{len(teachers)} (ids 0 to {len(teachers) - 1})"
            )
    answers: list = [None] * len(rows)
    for t, client in enumerate(teachers):
        mine = [i for i, r in enumerate(route) if r == t and rows[i] is not None]
        if mine:
            for i, ans in zip(mine, client.score([rows[i] for i in mine])):
                answers[i] = ans
    b, k = len(rows), teachers[0].top_k
    ids = torch.zeros((b, p, k), dtype=torch.int64)
    dtype = getattr(torch, teachers[0].logprob_dtype)
    lp = torch.zeros((b, p, k), dtype=dtype)
    tail = torch.zeros((b, p), dtype=dtype)
    mask = torch.zeros((b, p), dtype=torch.bool)
    for i, (pos, ans) in enumerate(zip(where, answers)):
        if ans is None:
            continue
        if len(ans[0]) != len(pos):
            raise LmkdError(
                f"the teacher server answered {len(ans[0])} positions for a row of {len(pos)}"
            )
        ids[i, pos] = torch.from_numpy(ans[0])
        lp[i, pos] = torch.from_numpy(ans[1]).to(dtype)  # (exact for an answer in this dtype)
        tail[i, pos] = torch.from_numpy(ans[2]).to(dtype)
        mask[i, pos] = True
    keys = {
        logit_cache.IDS: ids,
        logit_cache.LOGPROBS: lp,
        logit_cache.TAIL: tail,
        logit_cache.MASK: mask,
    }
    return _at_student_positions(keys, batch, kind) if cross else keys


class TeacherIdCollator:
    """Wraps a collator: takes :data:`lmkd.data.tokenizing.TEACHER_ID` off every example and returns
    the rows' teacher ids as a tensor under that key.

    Args:
        collator: the collator wrapped, called on the examples without that key.
    """

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        if not all(isinstance(f, dict) and TEACHER_ID in f for f in features):
            return self.collator(features)
        ids = torch.tensor([int(f[TEACHER_ID]) for f in features], dtype=torch.long)
        batch = self.collator([{k: v for k, v in f.items() if k != TEACHER_ID} for f in features])
        batch[TEACHER_ID] = ids
        return batch


class Prefetcher:
    """Pulls batches ahead of need and asks for each one's teacher answer in a thread pool.

    :meth:`take` returns the next ``n`` batches of an iterator, in order, each with its answer
    merged in; up to ``depth`` more batches are pulled and their requests started, so they run
    while the returned ones train.  A new iterator (a new epoch) drops what was pulled from the
    previous one (nothing: it was exhausted).

    Args:
        annotate: batch -> the keys to merge into it (runs in the pool).
        depth: batches asked for ahead of the ones handed out (0: none, each asked when taken).
        workers: requests in flight at once.
        merge: ``(batch, answer) -> batch`` (default: ``batch.update(answer)``).
    """

    def __init__(self, annotate, depth: int = 2, workers: int = 2, merge=None):
        self.annotate, self.depth = annotate, depth
        self.merge = merge or (lambda batch, answer: batch.update(answer) or batch)
        self.pool = ThreadPoolExecutor(
            max_workers=max(workers, 1), thread_name_prefix="lmkd-teacher"
        )
        self.queue: collections.deque = collections.deque()
        self.source = None

    def take(self, iterator, n: int) -> list[dict]:
        """The next ``n`` batches of ``iterator`` (fewer at its end), each with its answer.

        Args:
            iterator: the batches.
            n: how many.

        Returns:
            The batches, in order.

        Raises:
            TeacherServerDown: a request found no server (after its retries).
        """
        if self.source is not iterator:
            self.drop()
            self.source = iterator
        while len(self.queue) < n + self.depth:
            try:
                batch = next(iterator)
            except StopIteration:
                break
            self.queue.append((batch, self.pool.submit(self.annotate, batch)))
        out = []
        for _ in range(min(n, len(self.queue))):
            batch, future = self.queue.popleft()
            out.append(self.merge(batch, future.result()))
        return out

    def drop(self) -> None:
        """Forget the batches pulled ahead (their requests are cancelled or left to finish)."""
        for _, f in self.queue:
            f.cancel()
        self.queue.clear()

    def close(self) -> None:
        """Drop what is queued and stop the pool."""
        self.drop()
        self.pool.shutdown(wait=False, cancel_futures=True)
