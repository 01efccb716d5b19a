"""Which causal-lm row format a dataset is in (text, chat ``messages``, prompt/completion) and
which chat template renders it, with the one-line error for a tokenizer without one.  The
rendering and labelling is :mod:`lmkd.data.chat`'s (which re-exports these names).
"""

from __future__ import annotations

import os

from lmkd.core.constants import CAUSAL, TASK_KIND
from lmkd.core.errors import LmkdError

#: the row formats of causal-lm data (:func:`row_format`)
TEXT, MESSAGES, PROMPT_COMPLETION = "text", "messages", "prompt-completion"
#: the default chat column, and the prompt/completion columns
MESSAGES_COLUMN, PROMPT_COLUMN, COMPLETION_COLUMN = "messages", "prompt", "completion"


def _is_messages(feature) -> bool:
    """Whether a ``datasets`` feature is a list of {role, content} dicts."""
    inner = getattr(feature, "feature", None)  # datasets.List / Sequence
    if inner is None and isinstance(feature, list) and feature:
        inner = feature[0]
    return isinstance(inner, dict) and "role" in inner and "content" in inner


def messages_column(features, args) -> str | None:
    """The column of a causal-lm dataset holding chat messages, if any: ``args.source_column``
    when it holds lists of messages, else ``messages`` when the dataset has no ``source_column``.

    Args:
        features: the dataset's ``features`` (a mapping column -> feature).
        args: the data arguments (``task``, ``source_column``).

    Returns:
        The column's name, or None.
    """
    if TASK_KIND.get(args.task) != CAUSAL:
        return None
    src = args.source_column
    if src in features:
        return src if _is_messages(features[src]) else None
    return MESSAGES_COLUMN if MESSAGES_COLUMN in features else None


def row_format(features, args) -> str:
    """Which format a causal-lm dataset's rows are in: :data:`TEXT` (``source_column``, the
    default and every other task), :data:`MESSAGES` or :data:`PROMPT_COMPLETION` (``prompt`` and
    ``completion`` columns, and no ``source_column``).

    Args:
        features: the dataset's ``features`` (or any mapping / list of its column names).
        args: the data arguments.

    Returns:
        One of :data:`TEXT`, :data:`MESSAGES`, :data:`PROMPT_COMPLETION`.
    """
    if not hasattr(features, "get"):
        features = {c: None for c in features}
    if messages_column(features, args):
        return MESSAGES
    if (
        TASK_KIND.get(args.task) == CAUSAL
        and args.source_column not in features
        and PROMPT_COLUMN in features
        and COMPLETION_COLUMN in features
    ):
        return PROMPT_COMPLETION
    return TEXT


def data_columns(features, args) -> list[str]:
    """The columns a causal-lm dataset's rows are read from, by :func:`row_format`.

    Args:
        features: the dataset's ``features`` (or column names).
        args: the data arguments.

    Returns:
        ``[source_column]``, ``[the messages column]`` or ``["prompt", "completion"]``.
    """
    if not hasattr(features, "get"):
        features = {c: None for c in features}
    fmt = row_format(features, args)
    if fmt == MESSAGES:
        return [messages_column(features, args)]
    return [PROMPT_COLUMN, COMPLETION_COLUMN] if fmt == PROMPT_COMPLETION else [args.source_column]


def read_template_file(path: str) -> str:
    """The text of a Jinja chat template file.

    Args:
        path: the file.

    Returns:
        Its text.

    Raises:
        LmkdError: the file does not exist, cannot be read, or is empty.
    """
    if not os.path.isfile(path):
        raise LmkdError(f"chat_template: no file {path!r}; give a Jinja chat template file")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise LmkdError(f"chat_template: cannot read {path!r}: {e}") from e
    if not text.strip():
        raise LmkdError(f"chat_template: {path!r} is empty")
    return text


def chat_template(tokenizer, args=None) -> str:
    """The chat template the rows are rendered with: ``args.chat_template``'s file, else the
    tokenizer's own.

    Args:
        tokenizer: the tokenizer.
        args: the data arguments (their ``chat_template`` file), or None.

    Returns:
        The Jinja template's text.

    Raises:
        LmkdError: neither gives a template, or the file cannot be read.
    """
    path = getattr(args, "chat_template", None)
    if path:
        return read_template_file(path)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise LmkdError(
            f"the rows are chat messages but the tokenizer {name} has no chat template; give one "
            "with chat_template (--chat-template FILE, a Jinja file), or use text rows"
        )
    return template


def check_chat_data(features, tokenizer, args) -> str | None:
    """The template a dataset's rows need, checked before any work: None for text and string
    prompt/completion rows.

    Args:
        features: the dataset's ``features`` (or column names).
        tokenizer: the tokenizer the rows will be tokenised with.
        args: the data arguments.

    Returns:
        The template (chat rows), or None.

    Raises:
        LmkdError: chat rows and no template (:func:`chat_template`).
    """
    fmt = row_format(features, args)
    if fmt == MESSAGES or (fmt == PROMPT_COMPLETION and _list_valued(features)):
        return chat_template(tokenizer, args)
    if fmt == TEXT and getattr(args, "chat_template", None):
        read_template_file(args.chat_template)  # a wrong path is still a mistake
    return None


def _list_valued(features) -> bool:
    return hasattr(features, "get") and _is_messages(features.get(PROMPT_COLUMN))
