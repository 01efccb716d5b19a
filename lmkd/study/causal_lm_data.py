"""The causal-LM study's data: prompt/completion rows (:func:`read_prompt_rows`, the one function that
reads them) and their tokenisation with the loss on the response only (:func:`encode_rows`).

Prompt masking: lmkd's causal-lm data path (``lmkd.data``) trains on every token of a ``text``
column; a study of prompts and responses must train on the response only, so :func:`encode_rows`
builds ``input_ids`` = prompt + separator + completion + EOS and ``labels`` = ``IGNORE_INDEX`` on the
prompt and separator, the completion's ids after them.  The trainer's CE and KD masks of a causal LM
are its labels (``lmkd.data.positions.position_masks``), so neither term sees a prompt token.  When
``lmkd.data`` reads prompt/completion rows with that masking itself, :func:`encode_rows` is the one
function to replace.
"""

from __future__ import annotations

import os

from lmkd.core.constants import IGNORE_INDEX
from lmkd.core.errors import LmkdError
from lmkd.core.io import read_rows, write_jsonl

#: the study's default prompt/completion columns (--source-column / --target-column map others)
CAUSAL_COLUMNS = ("prompt", "completion")
#: chat rows' column: a list of ``{"role", "content"}`` turns, the last one the assistant's response
MESSAGES_COLUMN = "messages"
#: what separates a prompt from its response in the token sequence (tokenised on its own)
SEPARATOR = "\n"


def read_prompt_rows(
    path: str, prompt_column: str, completion_column: str, instruction: str | None = None
) -> list[dict]:
    """The study's reading of prompt/response data: ``prompt``/``completion`` rows (other columns
    named by the arguments), or chat rows: a ``messages`` column and no prompt column, or a prompt
    column holding lists of turns (:func:`_chat_rows`).  Rows with an empty prompt or response are
    dropped, with one line on stderr.

    Args:
        path: the data file (.jsonl[.gz], .json, .csv).
        prompt_column: the prompt's column.
        completion_column: the response's column.
        instruction: put before every prompt, on a line of its own (None: the prompt as it is).

    Returns:
        ``[{"prompt", "completion", "source"}]`` -- ``source`` the prompt column's text alone.

    Raises:
        LmkdError: a missing column, or no row with both filled in.
    """
    rows = read_rows(path)
    chat = _chat_column(rows[0], prompt_column)
    if chat is not None:
        return _dropped(path, len(rows), _chat_rows(path, rows, instruction, chat))
    missing = [c for c in (prompt_column, completion_column) if c not in rows[0]]
    if missing:
        raise LmkdError(
            f"{path} has no column {' or '.join(repr(c) for c in missing)} (it has: "
            f"{', '.join(rows[0])}); name the prompt and response columns with --source-column and "
            f"--target-column, or give chat rows (a {MESSAGES_COLUMN!r} column of role/content turns)"
        )
    out = []
    for r in rows:
        src, tgt = str(r[prompt_column] or "").strip(), str(r[completion_column] or "").strip()
        if src and tgt:
            prompt = f"{instruction}\n{src}" if instruction else src
            out.append({"prompt": prompt, "completion": tgt, "source": src})
    if not out:
        raise LmkdError(
            f"{path} has no row with both {prompt_column!r} and {completion_column!r} filled in"
        )
    return _dropped(path, len(rows), out)


def chat_column_of(path: str, prompt_column: str) -> str | None:
    """The column :func:`read_prompt_rows` reads chat turns from in ``path``, or None (prompt/completion
    rows).

    Args:
        path: the data file.
        prompt_column: the prompt column asked for.

    Returns:
        The column's name, or None.
    """
    return _chat_column(read_rows(path)[0], prompt_column)


def _chat_column(first: dict, prompt_column: str) -> str | None:
    """The chat column of a file whose first row is ``first``: the prompt column when it holds a list of
    turns (``--source-column conversation``), else ``messages`` when there is no prompt column; None
    for prompt/completion rows."""
    if isinstance(first.get(prompt_column), list):
        return prompt_column
    return MESSAGES_COLUMN if prompt_column not in first and MESSAGES_COLUMN in first else None


def _dropped(path: str, read: int, kept: list[dict]) -> list[dict]:
    """``kept``, after one line on stderr when rows were dropped (empty prompt or response, or a
    conversation that does not end with an assistant turn)."""
    if len(kept) < read:
        import sys

        print(
            f"lmkd study: {read - len(kept)} of {read} rows of {path} dropped (an empty prompt or "
            "response, or a conversation whose last turn is not the assistant's)",
            file=sys.stderr,
        )
    return kept


def render_turns(messages: list[dict]) -> str:
    """The study's rendering of the turns before a response: one ``role: content`` block per turn,
    separated by blank lines.  The study trains its own tokenizer, which has no chat template, and
    renders every conversation this way for every model (a given teacher's own template is what
    ``lmkd distill`` / ``generate`` use with ``--chat-template``).

    Args:
        messages: the turns (``role``, ``content``).

    Returns:
        The text.
    """
    return "\n\n".join(
        f"{m.get('role', 'user')}: {str(m.get('content') or '').strip()}" for m in messages
    )


def _chat_rows(path: str, rows: list[dict], instruction: str | None, column: str) -> list[dict]:
    """:func:`read_prompt_rows` of ``messages`` rows: the prompt is the conversation before its last
    assistant turn (:func:`render_turns`), the response that turn; ``source`` is the last user turn's
    last paragraph (what a copying answer copies: the text after the instruction).  Rows whose last
    turn is not the assistant's, or is empty, are dropped."""
    out = []
    for r in rows:
        turns = list(r[column] or [])
        if len(turns) < 2 or turns[-1].get("role") != "assistant":
            continue
        response = str(turns[-1].get("content") or "").strip()
        users = [m for m in turns[:-1] if m.get("role") == "user"]
        if not response or not users:
            continue
        prompt = render_turns(turns[:-1])
        if instruction:
            prompt = f"{instruction}\n{prompt}"
        last_user = str(users[-1].get("content") or "").strip()
        out.append(
            {"prompt": prompt, "completion": response, "source": last_user.split("\n\n")[-1]}
        )
    if not out:
        raise LmkdError(f"{path} has no {column} row that ends with an assistant turn")
    return out


def prepare_causal_split(
    out: str,
    path: str,
    prompt_column: str,
    completion_column: str,
    instruction: str | None,
    rows: int | None,
    split: str,
) -> None:
    """A data stage: the normalised rows of one split (:func:`read_prompt_rows`, the budget's limit).

    Args:
        out: the stage's directory.
        path: the split's file.
        prompt_column: the prompt's column.
        completion_column: the response's column.
        instruction: put before every prompt, or None.
        rows: the first N rows (None: all).
        split: train, validation or test (the file's name).
    """
    data = read_prompt_rows(path, prompt_column, completion_column, instruction)
    write_jsonl(os.path.join(out, f"{split}.jsonl"), data[:rows] if rows else data)


def eos_id(tokenizer) -> int:
    """The tokenizer's EOS id, which ends every response.

    Args:
        tokenizer: the tokenizer.

    Returns:
        The id.

    Raises:
        LmkdError: a tokenizer without an EOS token.
    """
    if tokenizer.eos_token_id is None:
        raise LmkdError(
            "the causal-LM study ends every response with the tokenizer's EOS token, and this "
            "tokenizer has none; give a teacher whose tokenizer has one"
        )
    return int(tokenizer.eos_token_id)


def prompt_ids(tokenizer, prompt: str, prompt_tokens: int) -> list[int]:
    """A prompt's token ids as the models read it: its first ``prompt_tokens`` tokens, then the
    :data:`SEPARATOR`'s (no special tokens: the scratch tokenizer would append EOS).

    Args:
        tokenizer: the tokenizer.
        prompt: the prompt's text.
        prompt_tokens: the prompt is cut at this many tokens (the separator comes on top).

    Returns:
        The ids.
    """
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"][:prompt_tokens]
    return ids + tokenizer(SEPARATOR, add_special_tokens=False)["input_ids"]


def encode_rows(
    tokenizer, rows: list[dict], prompt_tokens: int, completion_tokens: int, column="completion"
) -> list[dict]:
    """Each row as a training example with the loss on its response only: ``input_ids`` = the prompt
    (:func:`prompt_ids`) + the response (cut to ``completion_tokens - 1``) + EOS, ``labels`` =
    ``IGNORE_INDEX`` on the prompt's positions and the response's ids (and EOS) after them, and
    ``lmkd_prompt_length`` (what on-policy KD continues; ``lmkd.data.tokenizing.PROMPT_LENGTH``).

    Args:
        tokenizer: the tokenizer.
        rows: ``{"prompt", column}`` rows.
        prompt_tokens: the prompt's cut (:func:`prompt_ids`).
        completion_tokens: the response's cut, EOS included.
        column: the response's column (``completion``, or the teacher's ``teacher``).

    Returns:
        One dict per row: ``input_ids``, ``attention_mask``, ``labels``, ``lmkd_prompt_length``.
    """
    from lmkd.data.tokenizing import PROMPT_LENGTH

    eos = eos_id(tokenizer)
    out = []
    for r in rows:
        p = prompt_ids(tokenizer, r["prompt"], prompt_tokens)
        c = tokenizer(str(r[column]), add_special_tokens=False)["input_ids"]
        c = c[: completion_tokens - 1] + [eos]
        out.append(
            {
                "input_ids": p + c,
                "attention_mask": [1] * (len(p) + len(c)),
                "labels": [IGNORE_INDEX] * len(p) + c,
                PROMPT_LENGTH: len(p),
            }
        )
    return out


class PadCollator:
    """Right-pads encoded examples (:func:`encode_rows`): ``input_ids`` with the pad id,
    ``attention_mask`` with 0, ``labels`` with ``IGNORE_INDEX``; other integer keys are stacked.

    Args:
        pad_id: the pad token's id.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        fill = {"input_ids": self.pad_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        batch = {}
        for key in features[0]:
            if key in fill:
                batch[key] = torch.tensor(
                    [list(f[key]) + [fill[key]] * (width - len(f[key])) for f in features]
                )
            else:
                batch[key] = torch.tensor([int(f[key]) for f in features])
        return batch


def pad_id_of(tokenizer) -> int:
    """The pad id the study pads with: the tokenizer's, else its EOS (a GPT-2 tokenizer has none).

    Args:
        tokenizer: the tokenizer.

    Returns:
        The id.
    """
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer)
