"""The wire formats of a served teacher: lmkd's own protocol, vLLM's and SGLang's.

Each server is asked, for a list of rows of token ids, the teacher's top-k log-probs at every
position; each answer becomes, per row, the arrays a logit-cache row holds
(:mod:`lmkd.teacher.logit_cache`): top-k ids ``(n, k)``, their log-probs ``(n, k)`` and the log of
the remaining mass ``(n,)``.  Row ``r`` of a causal LM of tokens ``t_0 .. t_{L-1}`` has ``n = L - 1``
positions (position ``j`` predicts ``t_{j+1}``); a seq2seq row has one position per target token.

* **lmkd** (``lmkd serve-teacher``, :mod:`lmkd.teacher.served_server`): ``GET /info`` ->
  ``{"protocol", "kind", "vocab_size", "tokenizer", "max_positions", "encodings",
  "logprob_dtypes"}``; ``POST /topk`` with ``{"top_k": k, "rows": [{"input_ids": [...], "labels":
  [...]?}], "encoding"?, "logprob_dtype"?}`` (or ``{"text", "target"?}`` rows, tokenised by the
  server).  Two answers:

  - ``"encoding": "binary"`` (what :class:`lmkd.teacher.served.ServedTeacher` asks): an
    ``application/octet-stream`` body stored as a logit cache stores the same rows
    (:func:`encode_binary`): a 4-byte little-endian header length ``H``, a JSON header of ``H``
    bytes ``{"top_k", "ids", "logprobs", "n", "input_ids"?}`` (space-padded so the arrays start at a
    multiple of 8), then all rows' top-k ids ``(N, k)`` in the cache's id dtype
    (:func:`lmkd.teacher.logit_cache.id_dtype`: uint16 up to 65,536 ids, else int32), their
    log-probs ``(N, k)`` and tails ``(N,)`` in ``logprob_dtype`` (float16, the default, bfloat16 as
    its uint16 bits, or float32), little-endian, ``N = sum(n)``.
  - without ``encoding`` (or ``"json"``, the answer of lmkd before the binary one):
    ``{"rows": [{"n", "ids", "logprobs", "tail", "input_ids"?}]}``, arrays as base64 of
    little-endian ``int32`` / ``float32`` (:func:`encode_array`).

  The tail is the server's exact float32 log-sum-exp of the other log-probs, as ``lmkd
  cache-logits`` stores it, rounded to the answer's dtype as the cache rounds it.
* **vLLM** (OpenAI-compatible server, ``vllm serve``): ``POST /v1/completions`` with
  ``{"model", "prompt": [[ids], ...], "max_tokens": 1, "temperature": 0, "prompt_logprobs": k}``
  -> ``choices[i].prompt_logprobs``: one entry per prompt token, the first ``null``, each a map
  ``{"<token id>": {"logprob", "rank", "decoded_token"}}`` holding the top-k and the prompt's own
  token (so up to k + 1 entries).  vLLM refuses k above its ``--max-logprobs`` (default 20):
  ``"Requested prompt logprobs of K, which is greater than max allowed: 20"``.
* **SGLang** (``python -m sglang.launch_server``): ``POST /generate`` with ``{"input_ids": [[ids],
  ...], "sampling_params": {"max_new_tokens": 1, "temperature": 0}, "return_logprob": true,
  "logprob_start_len": 0, "top_logprobs_num": k}`` -> a list, per row ``meta_info.input_top_logprobs``:
  one entry per input token (the first ``null``), each a list of ``[logprob, token_id, text]``.

vLLM and SGLang return the top-k only: the tail is ``log(1 - sum_k p_k)`` computed here in float64
(``-inf`` when the top-k holds all the mass up to rounding).
"""

from __future__ import annotations

import base64
import hashlib
import json

import numpy as np
import torch

from lmkd.core.errors import LmkdError
from lmkd.teacher.logit_cache import LOGPROB_DTYPES, id_dtype, stored_logprobs

#: the protocol ``GET /info`` names; the binary answer is an addition a client asks for, so an older
#: client (no ``encoding``) still gets the JSON answer and a newer one reads an older server's
PROTOCOL = "lmkd-teacher/1"
#: the answers of ``POST /topk`` (its ``encoding``; JSON when absent)
ENCODINGS = ("json", "binary")
#: the Content-Type of the binary answer
BINARY_TYPE = "application/octet-stream"
#: the servers a run can name (``teacher_server``)
SERVERS = ("lmkd", "vllm", "sglang")
#: what vLLM says when asked more log-probs than ``--max-logprobs`` allows
VLLM_CAP_MESSAGE = "which is greater than max allowed"


def encode_array(a: np.ndarray) -> str:
    """Base64 of an array's little-endian bytes (the lmkd protocol's arrays).

    Args:
        a: an int32 or float32 array.

    Returns:
        The base64 text.
    """
    return base64.b64encode(
        np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()
    ).decode()


def decode_array(text: str, dtype, shape) -> np.ndarray:
    """The array :func:`encode_array` wrote.

    Args:
        text: the base64 text.
        dtype: its numpy dtype (little-endian ``int32`` or ``float32``).
        shape: its shape.

    Returns:
        The array (native byte order).
    """
    return (
        np.frombuffer(base64.b64decode(text), dtype=np.dtype(dtype).newbyteorder("<"))
        .reshape(shape)
        .astype(dtype)
    )


def answer_format(body: dict) -> tuple[str, str]:
    """``(encoding, logprob dtype)`` a ``POST /topk`` body asks for.

    Args:
        body: the request's JSON body.

    Returns:
        ``("json", "float32")`` without ``encoding``; ``("binary", dtype)`` for a binary answer
        (``logprob_dtype`` float16 by default, as ``lmkd cache-logits``).

    Raises:
        LmkdError: an unknown encoding or dtype, or a JSON answer asked in a dtype it cannot carry.
    """
    if not isinstance(body, dict):
        raise LmkdError('a /topk request is a JSON object {"top_k": k, "rows": [...]}')
    encoding = body.get("encoding", "json")
    if encoding not in ENCODINGS:
        raise LmkdError(f"unknown encoding {encoding!r}; choose one of {', '.join(ENCODINGS)}")
    dtype = body.get("logprob_dtype", "float16" if encoding == "binary" else "float32")
    if dtype not in LOGPROB_DTYPES:
        raise LmkdError(
            f"unknown logprob_dtype {dtype!r}; choose one of {', '.join(LOGPROB_DTYPES)}"
        )
    if encoding == "json" and dtype != "float32":
        raise LmkdError(
            f'the JSON answer carries float32 log-probs; ask "encoding": "binary" for {dtype}'
        )
    return encoding, dtype


def encode_json(rows: list[dict]) -> dict:
    """The JSON answer of scored rows (base64 of int32 ids, float32 log-probs and tails).

    Args:
        rows: per row ``{"n", "ids" (n, k), "logprobs" (n, k), "tail" (n,), "input_ids"?}`` arrays.

    Returns:
        ``{"rows": [...]}``.
    """
    out = []
    for r in rows:
        ans = {
            "n": int(r["n"]),
            "ids": encode_array(np.asarray(r["ids"], dtype=np.int32)),
            "logprobs": encode_array(np.asarray(r["logprobs"], dtype=np.float32)),
            "tail": encode_array(np.asarray(r["tail"], dtype=np.float32)),
        }
        if "input_ids" in r:
            ans["input_ids"] = r["input_ids"]
        out.append(ans)
    return {"rows": out}


def _le(dtype) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def _wire_dtype(logprob_dtype: str) -> np.dtype:
    """The numpy dtype log-probs of ``logprob_dtype`` travel in (bfloat16: its uint16 bits)."""
    return _le(np.uint16 if logprob_dtype == "bfloat16" else logprob_dtype)


def encode_binary(rows: list[dict], top_k: int, vocab: int, logprob_dtype: str) -> bytes:
    """The binary answer of scored rows, its arrays as a logit cache stores them.

    Args:
        rows: per row ``{"n", "ids" (n, k), "logprobs" (n, k), "tail" (n,), "input_ids"?}``
            (float32 log-probs).
        top_k: log-probs per position.
        vocab: the teacher's vocabulary size (the id dtype).
        logprob_dtype: one of :data:`lmkd.teacher.logit_cache.LOGPROB_DTYPES`.

    Returns:
        The body: header length (uint32 LE), JSON header, ids, log-probs, tails.
    """
    ids_dtype = _le(id_dtype(vocab))
    header = {
        "top_k": top_k,
        "ids": ids_dtype.name,
        "logprobs": logprob_dtype,
        "n": [int(r["n"]) for r in rows],
    }
    if any("input_ids" in r for r in rows):
        header["input_ids"] = [r.get("input_ids") for r in rows]
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(4 + len(head)) % 8)  # the arrays start at a multiple of 8

    def cat(key, shape):
        parts = [np.asarray(r[key]).reshape(shape) for r in rows]
        return np.concatenate(parts) if parts else np.zeros((0, *shape[1:]))

    ids = cat("ids", (-1, top_k)).astype(ids_dtype)
    lps = [
        stored_logprobs(
            torch.from_numpy(np.ascontiguousarray(cat(key, shape), np.float32)), logprob_dtype
        ).astype(_wire_dtype(logprob_dtype))
        for key, shape in (("logprobs", (-1, top_k)), ("tail", (-1,)))
    ]
    return b"".join(
        [len(head).to_bytes(4, "little"), head, ids.tobytes(), lps[0].tobytes(), lps[1].tobytes()]
    )


def widen(arr: np.ndarray, logprob_dtype: str) -> np.ndarray:
    """Log-probs as they travel (:func:`encode_binary`) -> float32, exactly.

    Args:
        arr: float16, float32, or the uint16 bits of bfloat16.
        logprob_dtype: which.

    Returns:
        The same values as float32.
    """
    if logprob_dtype == "bfloat16":
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def decode_binary(data: bytes, top_k: int) -> list[tuple]:
    """Per row ``(ids (n, k) int64, logprobs (n, k) float32, tail (n,) float32, input_ids?)`` of a
    binary answer; the log-probs are the answer's values (float16 or bfloat16) widened exactly.

    Args:
        data: the answer's body.
        top_k: the log-probs asked per position.

    Returns:
        One tuple per row, in order.

    Raises:
        LmkdError: a body that does not fit its header.
    """
    try:
        size = int.from_bytes(data[:4], "little")
        header = json.loads(data[4 : 4 + size])
        k, lp_dtype = int(header["top_k"]), header["logprobs"]
        counts = [int(n) for n in header["n"]]
        ids_dtype, wire = _le(header["ids"]), _wire_dtype(lp_dtype)
        if lp_dtype not in LOGPROB_DTYPES or ids_dtype.kind not in "iu":
            raise ValueError(f"dtypes {header['ids']} / {lp_dtype}")
    except (KeyError, TypeError, ValueError) as e:
        raise LmkdError(f"the lmkd teacher server sent an unreadable binary answer ({e})") from None
    if k != top_k:
        raise LmkdError(f"the lmkd teacher server answered top-{k} for top_k {top_k}")
    total = sum(counts)
    at = 4 + size
    want = at + total * k * ids_dtype.itemsize + total * (k + 1) * wire.itemsize
    if len(data) != want:
        raise LmkdError(
            f"the lmkd teacher server's binary answer is {len(data)} bytes; its header says {want}"
        )
    ids = np.frombuffer(data, ids_dtype, total * k, at).reshape(total, k).astype(np.int64)
    at += ids.size * ids_dtype.itemsize
    lp = widen(np.frombuffer(data, wire, total * k, at), lp_dtype).reshape(total, k)
    tail = widen(np.frombuffer(data, wire, total, at + total * k * wire.itemsize), lp_dtype)
    texts = header.get("input_ids") or [None] * len(counts)
    out, start = [], 0
    for n, text in zip(counts, texts):
        sl = slice(start, start + n)
        out.append((ids[sl], lp[sl], tail[sl], *(() if text is None else (text,))))
        start += n
    return out


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary (token -> id), the same for the same vocabulary.

    Args:
        tokenizer: a Hugging Face tokenizer.

    Returns:
        16 hex digits.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def tail_from_topk(logprobs: np.ndarray) -> np.ndarray:
    """``log(1 - sum_k p_k)`` per row, in float64 (``-inf`` when the top-k holds all the mass).

    Args:
        logprobs: ``(n, k)`` top-k log-probs.

    Returns:
        ``(n,)`` float32 log tail masses.
    """
    rest = 1.0 - np.exp(logprobs.astype(np.float64)).sum(-1)
    with np.errstate(divide="ignore"):
        return np.where(rest > 0, np.log(np.clip(rest, 1e-300, None)), -np.inf).astype(np.float32)


# ---- requests ------------------------------------------------------------------------------------


def request_for(
    server: str,
    rows: list[dict],
    top_k: int,
    model: str | None,
    logprob_dtype: str | None = None,
) -> tuple[str, dict]:
    """(path, JSON body) of one request for ``rows``.

    Args:
        server: one of :data:`SERVERS`.
        rows: ``{"input_ids": [...]}`` per row (``labels`` too for a seq2seq lmkd teacher).
        top_k: log-probs per position.
        model: the served model's name (vLLM's ``model`` field).
        logprob_dtype: lmkd: ask the binary answer with log-probs in this dtype (None: the JSON
            answer).

    Returns:
        The request path and body.
    """
    if server == "lmkd":
        body = {"top_k": top_k, "rows": rows}
        if logprob_dtype is not None:
            body.update(encoding="binary", logprob_dtype=logprob_dtype)
        return "/topk", body
    prompts = [[int(t) for t in r["input_ids"]] for r in rows]
    if server == "vllm":
        return "/v1/completions", {
            "model": model,
            "prompt": prompts,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": top_k,
        }
    return "/generate", {
        "input_ids": prompts,
        "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
        "return_logprob": True,
        "logprob_start_len": 0,
        "top_logprobs_num": top_k,
    }


# ---- answers -------------------------------------------------------------------------------------


def _positions(entries: list, n_tokens: int, server: str) -> list:
    """The per-position entries of one causal row: the first token has none."""
    if len(entries) == n_tokens:
        entries = entries[1:]
    if len(entries) != n_tokens - 1:
        raise LmkdError(
            f"the {server} teacher server answered {len(entries)} positions for a row of "
            f"{n_tokens} tokens; is it serving a causal LM?"
        )
    if any(e is None or len(e) == 0 for e in entries):
        raise LmkdError(
            f"the {server} teacher server left some prompt positions without log-probs (a prefix "
            "cache hit?); start it with prefix caching off (vllm serve ... "
            "--no-enable-prefix-caching; sglang ... --disable-radix-cache)"
        )
    return entries


def _top(pairs: list[tuple[float, int]], top_k: int, server: str):
    pairs = sorted(pairs, key=lambda p: -p[0])[:top_k]
    if len(pairs) < top_k:
        raise LmkdError(
            f"the {server} teacher server returned {len(pairs)} log-probs per position, fewer than "
            f"teacher_top_k {top_k}"
        )
    return [p[1] for p in pairs], [p[0] for p in pairs]


def parse_answer(server: str, answer, rows: list[dict], top_k: int) -> list[tuple]:
    """Per row, ``(ids (n, k) int64, logprobs (n, k) float32, tail (n,) float32)``.

    Args:
        server: one of :data:`SERVERS`.
        answer: the decoded JSON answer, or the body of lmkd's binary answer (bytes).
        rows: the rows asked (their token counts).
        top_k: log-probs per position.

    Returns:
        One tuple per row, in order (lmkd rows asked as text also carry the server's token ids as a
        fourth element).

    Raises:
        LmkdError: an answer that does not fit the request.
    """
    out = []
    if server == "lmkd":
        if isinstance(answer, (bytes, bytearray)):
            out = decode_binary(bytes(answer), top_k)
            if len(out) != len(rows):
                raise LmkdError(
                    f"the lmkd teacher server answered {len(out)} rows for {len(rows)} asked"
                )
            return out
        for r in answer["rows"]:
            n = int(r["n"])
            ids = decode_array(r["ids"], np.int32, (n, top_k)).astype(np.int64)
            lp = decode_array(r["logprobs"], np.float32, (n, top_k))
            tail = decode_array(r["tail"], np.float32, (n,))
            extra = (r["input_ids"],) if "input_ids" in r else ()
            out.append((ids, lp, tail, *extra))
        return out
    if server == "vllm":
        choices = sorted(answer["choices"], key=lambda c: c.get("index", 0))
        per_row = [c.get("prompt_logprobs") or [] for c in choices]
        decode = lambda e: [(float(v["logprob"]), int(t)) for t, v in e.items()]  # noqa: E731
    else:
        results = answer if isinstance(answer, list) else [answer]
        per_row = [r["meta_info"].get("input_top_logprobs") or [] for r in results]
        decode = lambda e: [(float(x[0]), int(x[1])) for x in e]  # noqa: E731
    if len(per_row) != len(rows):
        raise LmkdError(
            f"the {server} teacher server answered {len(per_row)} rows for {len(rows)} asked"
        )
    for entries, row in zip(per_row, rows):
        ids, lps = [], []
        for e in _positions(entries, len(row["input_ids"]), server):
            i, lp = _top(decode(e), top_k, server)
            ids.append(i)
            lps.append(lp)
        ids_a = np.asarray(ids, dtype=np.int64).reshape(-1, top_k)
        lp_a = np.asarray(lps, dtype=np.float32).reshape(-1, top_k)
        out.append((ids_a, lp_a, tail_from_topk(lp_a)))
    return out


def refusal_line(server: str, status: int, text: str, top_k: int) -> str:
    """The one line for a server's refusal (HTTP 4xx) of a request.

    Args:
        server: one of :data:`SERVERS`.
        status: the HTTP status.
        text: the body of the answer.
        top_k: the log-probs asked per position.

    Returns:
        The line: for vLLM's log-prob cap, the ``--max-logprobs`` flag that lifts it.
    """
    try:
        detail = json.loads(text)
        if isinstance(detail, dict):
            detail = detail.get("error", detail.get("message", detail))
            if isinstance(detail, dict):
                detail = detail.get("message", detail)
    except ValueError:
        detail = text
    detail = " ".join(str(detail).split())[:300]
    if VLLM_CAP_MESSAGE in detail or (server == "vllm" and "max_logprobs" in detail):
        return (
            f"the vLLM teacher server caps log-probs below teacher_top_k {top_k} ({detail}); "
            f"restart it with `vllm serve MODEL --max-logprobs {top_k}` or lower teacher_top_k"
        )
    return f"the {server} teacher server refused the request (HTTP {status}): {detail}"
