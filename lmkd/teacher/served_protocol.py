"""The wire formats of a served teacher: lmkd's own protocol, vLLM's and SGLang's.

Each server is asked, for a list of rows of token ids, the teacher's top-k log-probs at every
position; each answer becomes, per row, the arrays a logit-cache row holds
(:mod:`lmkd.teacher.logit_cache`): top-k ids ``(n, k)``, their log-probs ``(n, k)`` and the log of
the remaining mass ``(n,)``.  Row ``r`` of a causal LM of tokens ``t_0 .. t_{L-1}`` has ``n = L - 1``
positions (position ``j`` predicts ``t_{j+1}``); a seq2seq row has one position per target token.

* **lmkd** (``lmkd serve-teacher``, :mod:`lmkd.teacher.served_server`): ``GET /info`` ->
  ``{"protocol", "kind", "vocab_size", "tokenizer", "max_positions"}``; ``POST /topk`` with
  ``{"top_k": k, "rows": [{"input_ids": [...], "labels": [...]?}]}`` (or ``{"text", "target"?}``
  rows, tokenised by the server) -> ``{"rows": [{"n", "ids", "logprobs", "tail", "input_ids"?}]}``,
  arrays as base64 of little-endian ``int32`` / ``float32`` (:func:`encode_array`).  The tail is the
  server's exact float32 log-sum-exp of the other log-probs, as ``lmkd cache-logits`` stores it.
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

from lmkd.core.errors import LmkdError

PROTOCOL = "lmkd-teacher/1"
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


def request_for(server: str, rows: list[dict], top_k: int, model: str | None) -> tuple[str, dict]:
    """(path, JSON body) of one request for ``rows``.

    Args:
        server: one of :data:`SERVERS`.
        rows: ``{"input_ids": [...]}`` per row (``labels`` too for a seq2seq lmkd teacher).
        top_k: log-probs per position.
        model: the served model's name (vLLM's ``model`` field).

    Returns:
        The request path and body.
    """
    if server == "lmkd":
        return "/topk", {"top_k": top_k, "rows": rows}
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
        answer: the decoded JSON answer.
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
