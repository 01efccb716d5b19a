"""Chat and prompt/completion rows for causal-LM distillation: the text a causal LM reads, and
labels on the tokens it should learn to write (the assistant's, the completion's) only.

Two row formats besides plain ``text`` (:func:`row_format` tells them apart by their columns):

* **messages**: ``{"messages": [{"role": "system" | "user" | "assistant" | "tool", "content":
  ...}, ...]}`` (the column is ``source_column`` when it holds such lists, else ``messages``),
  rendered with the tokenizer's chat template or a Jinja file (``chat_template``).  Every
  assistant turn is learned: its content and what the template writes after it up to the next
  turn (its end-of-turn marker, e.g. ``<|im_end|>\\n``).  Everything else -- system, user and tool
  turns, the role markers, the generation prompt -- is labelled ``IGNORE_INDEX``.
* **prompt / completion**: ``{"prompt": ..., "completion": ...}``: the prompt then the
  completion (and the tokenizer's EOS, unless it already ends the row); the completion's tokens
  are learned.  Both as lists of messages: rendered as ``prompt + completion`` messages.

How the assistant tokens are found (:func:`encode_chat`): not from a template's
``{% generation %}`` markers (few templates have them) but by rendering incrementally -- the
conversation before each assistant turn with the generation prompt, and up to the end of that
turn -- so the rendering is cut into pieces at those points; each piece is tokenised alone and
the pieces' tokens concatenated.  That is exactly what a model reads at inference (the prompt is
tokenised, the answer generated), and it must equal the tokens of the whole rendering: when it
does not (the template rewrites earlier turns, or a token straddles a cut), the row is refused
in one line (:class:`TemplateNotPrefixStable`) rather than labelled approximately.

Each row's prompt length (:data:`lmkd.data.tokenizing.PROMPT_LENGTH`, for on-policy KD) is the
tokens before its last assistant turn (generation prompt included) / before its completion.

**For other callers** (``lmkd study --task causal-lm``, ``lmkd generate``):

* :func:`row_format` (``"text"``, ``"messages"`` or ``"prompt-completion"``) of a dataset's columns;
* :func:`prompt_and_response` turns one row into ``(prompt_text, response_text)``: the rendered
  prompt (up to and including the generation prompt of the last assistant turn) and that turn's
  content -- what a teacher is asked to continue and the reference it is scored against;
* :func:`lmkd.data.tokenizing.tokenize` tokenises whole datasets of any format (it calls
  :func:`encode_rows`), labels masked as above;
* :func:`chat_template` / :func:`check_chat_data`: the template used, and the one-line error for
  a tokenizer without one, to call before any work.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmkd.core.constants import IGNORE_INDEX
from lmkd.core.errors import LmkdError
from lmkd.data.chat_formats import (
    COMPLETION_COLUMN,
    MESSAGES,
    MESSAGES_COLUMN,
    PROMPT_COLUMN,
    PROMPT_COMPLETION,
    TEXT,
    chat_template,
    check_chat_data,
    data_columns,
    messages_column,
    read_template_file,
    row_format,
)

__all__ = [
    "COMPLETION_COLUMN",
    "MESSAGES",
    "MESSAGES_COLUMN",
    "PROMPT_COLUMN",
    "PROMPT_COMPLETION",
    "TEXT",
    "TemplateNotPrefixStable",
    "assistant_spans",
    "chat_template",
    "check_chat_data",
    "data_columns",
    "encode_chat",
    "encode_prompt_completion",
    "encode_row",
    "encode_rows",
    "messages_column",
    "prompt_and_response",
    "read_template_file",
    "render",
    "row_format",
    "with_response",
]


class TemplateNotPrefixStable(LmkdError):
    """A chat template whose rendering of a conversation does not start with its rendering of the
    conversation's beginning (or whose pieces tokenise differently from the whole): its assistant
    tokens cannot be found exactly.

    Args:
        *args: the message (one line).
    """


def render(messages, tokenizer, template: str, add_generation_prompt: bool = False) -> str:
    """``messages`` rendered by ``template`` (text, not tokens).

    Args:
        messages: the conversation (dicts with ``role`` and ``content``).
        tokenizer: the tokenizer (its special tokens are the template's variables).
        template: the Jinja chat template.
        add_generation_prompt: end with the template's assistant header.

    Returns:
        The rendered text.

    Raises:
        LmkdError: the template fails on the conversation (its message, in one line).
    """
    try:
        return tokenizer.apply_chat_template(
            list(messages),
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as e:  # jinja2's TemplateError, or a template's raise_exception()
        said = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LmkdError(f"the chat template fails on a conversation: {said}") from e


def _content(message) -> str:
    content = message.get("content")
    if isinstance(content, list):  # multimodal-style parts: their text
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def assistant_spans(messages, tokenizer, template: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendering of ``messages`` and the character span of each assistant turn in it: from
    the end of the generation prompt (the turn's content, when the template has no generation
    prompt) to the end of the turn as rendered.

    Args:
        messages: the conversation.
        tokenizer: the tokenizer.
        template: the Jinja chat template.

    Returns:
        ``(text, spans)``.

    Raises:
        TemplateNotPrefixStable: a rendering of the conversation's beginning is not where the
            whole rendering starts.
    """
    messages = list(messages)
    text = render(messages, tokenizer, template)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = render(messages[:i], tokenizer, template) if i else ""
        asked = render(messages[:i], tokenizer, template, add_generation_prompt=True) if i else ""
        upto = render(messages[: i + 1], tokenizer, template)
        if not (upto.startswith(asked) and text.startswith(upto)):
            raise TemplateNotPrefixStable(
                f"the chat template is not prefix-stable: rendering the conversation up to assistant "
                f"turn {len(spans) + 1} does not give the start of the whole rendering (it rewrites "
                "earlier turns), so its assistant tokens cannot be found exactly; use a template "
                "that renders each turn the same way whatever follows (chat_template)"
            )
        start = len(asked)
        content = _content(m).strip()
        if asked == before and content:  # no generation prompt: start at the content itself
            found = upto.find(content, start)
            start = found if found >= 0 else start
        spans.append((start, len(upto)))
    return text, spans


def _encode_pieces(tokenizer, text: str, cuts: Sequence[int]) -> list[list[int]]:
    bounds = [0, *cuts, len(text)]
    return [
        tokenizer(text[a:b], add_special_tokens=False)["input_ids"] if b > a else []
        for a, b in zip(bounds, bounds[1:])
    ]


def encode_chat(messages, tokenizer, template: str) -> tuple[list[int], list[int], int]:
    """Token ids, labels and prompt length of one conversation (see the module's docstring).

    Args:
        messages: the conversation.
        tokenizer: the tokenizer.
        template: the Jinja chat template.

    Returns:
        ``(input_ids, labels, prompt_length)``: labels are the ids on assistant tokens and
        ``IGNORE_INDEX`` elsewhere; the prompt is every token before the last assistant turn.

    Raises:
        LmkdError: no assistant turn; :class:`TemplateNotPrefixStable`.
    """
    text, spans = assistant_spans(messages, tokenizer, template)
    if not spans:
        raise LmkdError(
            "a chat row has no assistant turn, so nothing to learn; every row of messages needs "
            "at least one message with role 'assistant'"
        )
    cuts = sorted({c for span in spans for c in span if 0 < c < len(text)})
    pieces = _encode_pieces(tokenizer, text, cuts)
    ids = [t for piece in pieces for t in piece]
    if ids != tokenizer(text, add_special_tokens=False)["input_ids"]:
        raise TemplateNotPrefixStable(
            "the chat template is not prefix-stable for this tokenizer: its rendering tokenised "
            "whole differs from its prompt and assistant pieces tokenised apart (a token straddles "
            "where an assistant turn starts or ends); end the generation prompt and each turn "
            "with a special token or a newline (chat_template)"
        )
    learned = [False] * len(ids)
    pos, bounds = 0, [0, *cuts, len(text)]
    for a, piece in zip(bounds, pieces):
        inside = any(s <= a < e for s, e in spans)
        for k in range(pos, pos + len(piece)):
            learned[k] = inside
        pos += len(piece)
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, learned)]
    last = spans[-1][0]
    prompt_length = sum(len(p) for a, p in zip(bounds, pieces) if a < last)
    return ids, labels, prompt_length


def encode_prompt_completion(prompt, completion, tokenizer) -> tuple[list[int], list[int], int]:
    """Token ids, labels and prompt length of a prompt/completion row: the tokens of
    ``prompt + completion`` (as plain text rows are tokenised), EOS appended unless they end
    with it; the prompt is the tokens that ``prompt`` tokenised alone shares with them at the start.

    Args:
        prompt: the prompt text.
        completion: the completion text.
        tokenizer: the tokenizer.

    Returns:
        ``(input_ids, labels, prompt_length)``: labels are the ids after the prompt.

    Raises:
        LmkdError: an empty completion.
    """
    prompt, completion = str(prompt), str(completion)
    if not completion:
        raise LmkdError("a prompt/completion row has an empty completion, so nothing to learn")
    ids = list(tokenizer(prompt + completion)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
    p_ids = tokenizer(prompt)["input_ids"] if prompt else []
    n = next((i for i, (a, b) in enumerate(zip(p_ids, ids)) if a != b), min(len(p_ids), len(ids)))
    labels = [IGNORE_INDEX] * n + ids[n:]
    return ids, labels, n


def encode_row(row: dict, fmt: str, tokenizer, template: str | None, column: str | None = None):
    """``(input_ids, labels, prompt_length)`` of one row of format ``fmt``.

    Args:
        row: the row.
        fmt: :data:`MESSAGES` or :data:`PROMPT_COMPLETION`.
        tokenizer: the tokenizer.
        template: the chat template (chat rows; None for string prompt/completion rows).
        column: the messages column (:data:`MESSAGES` rows).

    Returns:
        As :func:`encode_chat`.

    Raises:
        LmkdError: as :func:`encode_chat` / :func:`encode_prompt_completion`.
    """
    if fmt == MESSAGES:
        return encode_chat(row[column or MESSAGES_COLUMN], tokenizer, template)
    prompt, completion = row[PROMPT_COLUMN], row[COMPLETION_COLUMN]
    if isinstance(prompt, list):
        return encode_chat(list(prompt) + list(completion), tokenizer, template)
    return encode_prompt_completion(prompt, completion, tokenizer)


def encode_rows(batch: dict, features, tokenizer, args, length: int | None) -> tuple[dict, list]:
    """A batch of chat or prompt/completion rows encoded, cut to ``length`` tokens.

    Args:
        batch: the rows, column -> values (``datasets.map(batched=True)``'s batch).
        features: the dataset's ``features``.
        tokenizer: the tokenizer.
        args: the data arguments.
        length: the most tokens a row keeps (None: all).

    Returns:
        ``(encoding, cut)``: ``input_ids``, ``attention_mask``, ``labels`` and ``prompt_lengths``
        per row, and the indices of the rows cut.

    Raises:
        LmkdError: as :func:`encode_row`, or a template is needed and missing.
    """
    fmt = row_format(features, args)
    template = check_chat_data(features, tokenizer, args)
    column = messages_column(features, args)
    n = len(next(iter(batch.values())))
    out: dict = {"input_ids": [], "attention_mask": [], "labels": [], "prompt_lengths": []}
    cut = []
    for i in range(n):
        row = {k: v[i] for k, v in batch.items()}
        ids, labels, p = encode_row(row, fmt, tokenizer, template, column)
        if length is not None and len(ids) > length:
            ids, labels = ids[:length], labels[:length]
            cut.append(i)
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(labels)
        out["prompt_lengths"].append(max(1, min(p, len(ids))))
    return out, cut


def with_response(messages, response: str) -> list[dict]:
    """``messages`` with ``response`` as the assistant's last turn: it replaces the last message
    when that is the assistant's, else it is appended (what ``lmkd generate`` writes as
    ``teacher_messages``).

    Args:
        messages: the conversation.
        response: the new answer.

    Returns:
        The new conversation (``role`` / ``content`` dicts).
    """
    msgs = [{"role": m["role"], "content": _content(m)} for m in messages]
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return msgs + [{"role": "assistant", "content": str(response)}]


def prompt_and_response(row: dict, tokenizer, args, features=None) -> tuple[str, str]:
    """One row as ``(prompt_text, response_text)``: chat rows, the rendering of the conversation
    before its last assistant turn with the generation prompt, and that turn's content (rows whose
    last message is not the assistant's: all of it, and ``""``); prompt/completion rows, the two
    texts; text rows, the text and ``""``.

    Args:
        row: the row.
        tokenizer: the tokenizer whose template renders the prompt.
        args: the data arguments (``chat_template``, ``source_column``, ``task``).
        features: the dataset's features (None: the row's own keys and values).

    Returns:
        ``(prompt_text, response_text)``.

    Raises:
        LmkdError: chat rows and no template.
    """
    if features is None:
        features = {k: ([v[0]] if isinstance(v, list) and v else v) for k, v in row.items()}
    fmt = row_format(features, args)
    if fmt == TEXT:
        return str(row[args.source_column]), ""
    if fmt == PROMPT_COMPLETION and not isinstance(row[PROMPT_COLUMN], list):
        return str(row[PROMPT_COLUMN]), str(row[COMPLETION_COLUMN])
    template = chat_template(tokenizer, args)
    if fmt == MESSAGES:
        messages = list(row[messages_column(features, args)])
    else:
        messages = list(row[PROMPT_COLUMN]) + list(row[COMPLETION_COLUMN])
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None or last != len(messages) - 1:
        return render(messages, tokenizer, template, add_generation_prompt=True), ""
    prompt = render(messages[:last], tokenizer, template, add_generation_prompt=True)
    return prompt, _content(messages[last])
