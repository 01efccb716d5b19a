"""``lmkd serve-teacher``: a Hugging Face teacher behind lmkd's HTTP protocol.

Any causal or seq2seq LM that ``from_pretrained`` loads answers, for rows of token ids (or of text,
tokenised here: for a student of another tokenizer), its top-k log-probs at every position and the
log of the remaining mass -- what ``lmkd cache-logits`` stores (the same function,
:func:`lmkd.teacher.logit_cache_writer.teacher_topk`), in the binary answer stored as the cache stores
it (ids uint16 when the vocabulary fits, log-probs in the dtype asked).  The wire formats are in
:mod:`lmkd.teacher.served_protocol`.

Standard library only: a ``ThreadingHTTPServer`` whose handler threads put their rows in a queue;
one worker thread takes what is queued (up to ``max_batch_rows`` rows, the requests of one k),
runs the teacher on them as one padded batch, and answers each request.  So concurrent requests
(a trainer's prefetch, several trainers) share the teacher's forward passes.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from lmkd.core.constants import CAUSAL, IGNORE_INDEX, SEQ2SEQ
from lmkd.core.errors import LmkdError
from lmkd.models.loading import load_model, load_tokenizer, model_kind
from lmkd.models.truncation import input_limit, target_limit
from lmkd.models.vocabulary import vocab_size_of
from lmkd.teacher.logit_cache import LOGPROB_DTYPES
from lmkd.teacher.logit_cache_writer import teacher_topk
from lmkd.teacher.served_protocol import (
    BINARY_TYPE,
    ENCODINGS,
    PROTOCOL,
    answer_format,
    encode_binary,
    encode_json,
    tokenizer_fingerprint,
)

logger = logging.getLogger(__name__)


class TeacherScorer:
    """A frozen teacher answering top-k requests, batched by one worker thread.

    Args:
        model: the teacher (a causal or seq2seq LM) or its path.
        tokenizer: its tokenizer (None: loaded from ``model``'s path).
        device: where it runs (e.g. ``cpu``, ``cuda``).
        max_batch_rows: rows of queued requests run in one forward.
        dtype: the dtype it runs in (``auto``: as saved); log-softmaxes are float32.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        device: str = "cpu",
        max_batch_rows: int = 64,
        dtype: str = "auto",
    ):
        path = model if isinstance(model, str) else None
        self.model = load_model(model, dtype=dtype).to(device).eval()
        self.model.requires_grad_(False)
        self.kind = model_kind(self.model)
        if self.kind not in (CAUSAL, SEQ2SEQ):
            raise LmkdError(
                f"lmkd serve-teacher serves causal and seq2seq LMs; {path or 'the model'} is a "
                f"{self.kind} model"
            )
        self.tokenizer = (
            tokenizer if tokenizer is not None or path is None else load_tokenizer(path)
        )
        self.device, self.max_batch_rows = device, max_batch_rows
        self.vocab = vocab_size_of(self.model)
        self.name = path or type(self.model).__name__
        self.jobs: queue.Queue = queue.Queue()
        self.batches = 0  # forward passes run (a request may share one with others)
        self.worker = threading.Thread(target=self._work, daemon=True, name="lmkd-teacher-worker")
        self.worker.start()

    def info(self) -> dict:
        """What ``GET /info`` answers.

        Returns:
            Protocol, kind, vocabulary size, tokenizer fingerprint, position limits, the answers'
            encodings and log-prob dtypes.
        """
        return {
            "protocol": PROTOCOL,
            "model": self.name,
            "kind": self.kind,
            "vocab_size": self.vocab,
            "tokenizer": tokenizer_fingerprint(self.tokenizer) if self.tokenizer else None,
            "max_positions": input_limit(self.model),
            "max_target_positions": target_limit(self.model) if self.kind == SEQ2SEQ else None,
            "encodings": list(ENCODINGS),
            "logprob_dtypes": list(LOGPROB_DTYPES),
        }

    def submit(self, rows: list[dict], top_k: int) -> Future:
        """Queue one request; the worker answers it.

        Args:
            rows: the request's rows (token ids, or text).
            top_k: log-probs per position.

        Returns:
            A future of the answer's rows.
        """
        rows = [self._tokens(r) for r in rows]
        if not 1 <= top_k <= self.vocab:
            raise LmkdError(f"top_k must be in [1, {self.vocab}], got {top_k}")
        for r in rows:
            bad = [t for t in r["input_ids"] + r.get("labels", []) if t >= self.vocab or t < -100]
            if bad:
                raise LmkdError(f"token id {bad[0]} is outside the teacher's {self.vocab} ids")
            if self.kind == SEQ2SEQ and not r.get("labels"):
                raise LmkdError("a seq2seq teacher scores target tokens: give each row labels")
            if self.kind == CAUSAL and len(r["input_ids"]) < 2:
                raise LmkdError("a causal row needs at least 2 tokens (one position to score)")
        future: Future = Future()
        self.jobs.put((rows, top_k, future))
        return future

    def _tokens(self, row: dict) -> dict:
        if "input_ids" in row:
            return {k: [int(t) for t in v] for k, v in row.items() if k in ("input_ids", "labels")}
        if self.tokenizer is None:
            raise LmkdError("this teacher has no tokenizer: send token ids (input_ids)")
        out = {"input_ids": self.tokenizer(row["text"])["input_ids"], "from_text": True}
        if "target" in row:
            out["labels"] = self.tokenizer(text_target=row["target"])["input_ids"]
        return out

    def _work(self) -> None:
        while True:
            jobs = [self.jobs.get()]
            n = len(jobs[0][0])
            while n < self.max_batch_rows:  # what else is queued now, of the same k
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job[1] != jobs[0][1]:
                    self.jobs.put(job)
                    break
                jobs.append(job)
                n += len(job[0])
            try:
                answers = self.score([r for j in jobs for r in j[0]], jobs[0][1])
            except Exception as e:  # noqa: BLE001 -- each request hears why
                for j in jobs:
                    j[2].set_exception(e)
                continue
            for j in jobs:
                j[2].set_result(answers[: len(j[0])])
                answers = answers[len(j[0]) :]

    def score(self, rows: list[dict], top_k: int) -> list[dict]:
        """Run the teacher on ``rows`` as one padded batch: per row its top-k arrays (each request's
        answer is encoded by the thread that serves it, in the encoding that request asked).

        Args:
            rows: ``{"input_ids", "labels"?}`` rows.
            top_k: log-probs per position.

        Returns:
            Per row ``{"n", "ids" (n, k) int64, "logprobs" (n, k) float32, "tail" (n,) float32}``
            numpy arrays (+ ``input_ids`` for rows sent as text).
        """
        self.batches += 1
        b = len(rows)
        width = max(len(r["input_ids"]) for r in rows)
        pad = getattr(self.model.config, "pad_token_id", None) or 0
        ids = torch.full((b, width), pad, dtype=torch.long)
        att = torch.zeros((b, width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
            att[i, : len(r["input_ids"])] = 1
        batch = {"input_ids": ids.to(self.device), "attention_mask": att.to(self.device)}
        if self.kind == SEQ2SEQ:
            t = max(len(r["labels"]) for r in rows)
            labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
            for i, r in enumerate(rows):
                labels[i, : len(r["labels"])] = torch.tensor(r["labels"])
            batch["labels"] = labels.to(self.device)
            counts = [int((labels[i] != IGNORE_INDEX).sum()) for i in range(b)]
        else:
            counts = [len(r["input_ids"]) - 1 for r in rows]
        top_ids, top_lp, tail, _, _ = teacher_topk(self.model, self.kind, batch, top_k)
        top_ids = top_ids.cpu().numpy()
        top_lp, tail = top_lp.float().cpu().numpy(), tail.float().cpu().numpy()
        out, start = [], 0
        for r, n in zip(rows, counts):
            sl = slice(start, start + n)
            ans = {"n": n, "ids": top_ids[sl], "logprobs": top_lp[sl], "tail": tail[sl]}
            if r.get("from_text"):
                ans["input_ids"] = r["input_ids"]
            out.append(ans)
            start += n
        return out


def _handler(scorer: TeacherScorer, timeout: float):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # the access log at debug level, not on stderr
            logger.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, status: int, body: dict | bytes) -> None:
            binary = isinstance(body, bytes)
            data = body if binary else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", BINARY_TYPE if binary else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 -- http.server's name
            if self.path.rstrip("/") == "/info":
                self._send(200, scorer.info())
            else:
                self._send(404, {"error": f"no {self.path}: GET /info, POST /topk"})

        def do_POST(self):  # noqa: N802 -- http.server's name
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length)
            if self.path.rstrip("/") != "/topk":
                self._send(404, {"error": f"no {self.path}: GET /info, POST /topk"})
                return
            try:
                body = json.loads(raw)
                encoding, dtype = answer_format(body)
                top_k = int(body["top_k"])
                future = scorer.submit(body["rows"], top_k)
            except (LmkdError, KeyError, TypeError, ValueError) as e:
                self._send(400, {"error": str(e)})
                return
            try:
                rows = future.result(timeout=timeout)
            except LmkdError as e:
                self._send(400, {"error": str(e)})
                return
            except Exception as e:  # noqa: BLE001 -- the client hears it as a server error
                self._send(500, {"error": f"{type(e).__name__}: {e}"})
                return
            if encoding == "binary":
                self._send(200, encode_binary(rows, top_k, scorer.vocab, dtype))
            else:
                self._send(200, encode_json(rows))

    return Handler


def make_server(
    model,
    host: str = "127.0.0.1",
    port: int = 0,
    device: str = "cpu",
    max_batch_rows: int = 64,
    tokenizer=None,
    timeout: float = 600.0,
    dtype: str = "auto",
) -> ThreadingHTTPServer:
    """The HTTP server of a teacher (not started: call ``serve_forever``).

    Args:
        model: the teacher or its path.
        host: the address to listen on.
        port: the port (0: a free one; read it from ``server.server_address``).
        device: where the teacher runs.
        max_batch_rows: rows of queued requests run in one forward.
        tokenizer: the teacher's tokenizer (None: loaded with the model).
        timeout: seconds a request waits for its answer.
        dtype: the dtype the teacher runs in (``auto``: as saved).

    Returns:
        The server; its ``scorer`` attribute is the :class:`TeacherScorer`.
    """
    scorer = TeacherScorer(model, tokenizer, device, max_batch_rows, dtype)
    server = ThreadingHTTPServer((host, port), _handler(scorer, timeout))
    server.daemon_threads = True
    server.scorer = scorer
    return server


def serve_in_thread(model, **kwargs) -> tuple[ThreadingHTTPServer, str]:
    """A teacher server running in a daemon thread of this process (tests, benchmarks).

    Args:
        model: the teacher or its path.
        **kwargs: :func:`make_server`'s keywords.

    Returns:
        (the server -- stop it with ``shutdown()`` then ``server_close()`` -- , its URL).
    """
    server = make_server(model, **kwargs)
    threading.Thread(
        target=server.serve_forever, args=(0.05,), daemon=True, name="lmkd-teacher-http"
    ).start()
    host, port = server.server_address[:2]
    return server, f"http://{host}:{port}"
