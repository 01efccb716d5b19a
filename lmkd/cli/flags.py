"""One flag convention for every command: ``--kd-alpha`` and ``--kd_alpha`` are the same flag.

Every long option of every ``lmkd`` parser is accepted in both spellings -- dashed and with
underscores -- as transformers' ``HfArgumentParser`` does for its dataclass fields; ``--help`` (and
``lmkd distill --help-keys``) show one: the dashed.  The other spelling, and the old names a flag
was renamed from (:func:`hidden_alias`), are registered with the parser but left out of the help.

* :func:`one_spelling` -- run once over a finished parser (and its subcommands);
* :func:`hidden_alias` -- an old name of a flag, still accepted, not shown;
* :func:`did_you_mean` -- the flag a user most likely meant by an unknown one;
* :class:`Parser` -- argparse with one-line errors that suggest a flag for an unknown one.
"""

from __future__ import annotations

import argparse
import difflib
import math

#: what users type for a flag, from the other commands' habits -> the dashed flag each command calls it
#: (a command that has the value of the dict as a flag suggests it for the key)
SHORT_FORMS = {
    "--teacher": ("--teacher-model-name-or-path",),
    "--student": ("--student-model-name-or-path", "--model"),
    "--model": ("--student-model-name-or-path",),
    "--output": ("--output-dir",),
    "--output-dir": ("--output",),
    "--data": ("--train-file", "--train"),
    "--train-file": ("--data", "--train"),
    "--beams": ("--num-beams",),
    "--batch-size": ("--per-device-train-batch-size", "--train-batch-size"),
    "--steps": ("--max-steps", "--student-steps", "--finetune-steps"),
    "--epochs": ("--num-train-epochs",),
    "--lr": ("--learning-rate",),
    "--alpha": ("--kd-alpha",),
    "--temperature": ("--kd-temperature",),
    "--dtype": ("--cache-dtype", "--teacher-dtype"),
    # the log-probs' dtype: cache-logits stores them in it, distill asks a served teacher for it
    "--cache-dtype": ("--teacher-logprob-dtype",),
    "--teacher-logprob-dtype": ("--cache-dtype",),
    "--logprob-dtype": ("--cache-dtype", "--teacher-logprob-dtype"),
}


def dashed(option: str) -> str:
    """``--kd_alpha`` -> ``--kd-alpha`` (the leading ``--`` kept).

    Args:
        option: a long option string.

    Returns:
        The option with every ``_`` after the leading dashes turned into ``-``.
    """
    return "--" + option[2:].replace("_", "-")


def spellings(option: str) -> tuple[str, str]:
    """Both spellings of a long option.

    Args:
        option: a long option string in either spelling.

    Returns:
        ``(dashed, underscored)``; the two are equal for an option without a dash or underscore.
    """
    return dashed(option), "--" + option[2:].replace("-", "_")


def _parsers(parser: argparse.ArgumentParser):
    """``parser`` and every subcommand parser under it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # (an alias maps to the same parser)
                yield from _parsers(sub)


def one_spelling(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make every long option of ``parser`` and its subcommands answer to both spellings, and show
    only the dashed one in ``--help`` and in its errors.

    The other spelling goes into the parser's table of option strings (which argparse matches
    arguments against) but not into the action's ``option_strings`` (which the help lists).

    Args:
        parser: a finished parser (every argument added), an ``HfArgumentParser`` included.

    Returns:
        The same parser, changed in place.
    """
    for p in _parsers(parser):
        for action in p._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            if not longs:
                continue
            shown = list(
                dict.fromkeys(dashed(o) if o.startswith("--") else o for o in action.option_strings)
            )
            for option in longs:
                for spelling in spellings(option):
                    p._option_string_actions.setdefault(spelling, action)
            action.option_strings = shown
    return parser


def hidden_alias(parser: argparse.ArgumentParser, flag: str, *aliases: str) -> None:
    """Accept ``aliases`` (old names of ``flag``) without listing them in ``--help``.

    Args:
        parser: the parser that has ``flag``.
        flag: the flag's shown (dashed) name.
        *aliases: the old names, each accepted in both spellings.

    Returns:
        None.
    """
    action = parser._option_string_actions[flag]
    for alias in aliases:
        for spelling in spellings(alias):
            parser._option_string_actions[spelling] = action


def shown_options(parser: argparse.ArgumentParser) -> list[str]:
    """The long options ``parser`` lists in its help.

    Args:
        parser: a parser.

    Returns:
        Its actions' long option strings, in order.
    """
    return [
        o
        for a in parser._actions
        for o in a.option_strings
        if o.startswith("--") and a.help is not argparse.SUPPRESS
    ]


def did_you_mean(given: str, options: list[str]) -> str | None:
    """The flag a user most likely meant by the unknown ``given``, or None.

    In order: the same flag in the other spelling; the flag that users of another lmkd command
    would call ``given`` (:data:`SHORT_FORMS`: distill's ``--teacher`` is
    ``--teacher-model-name-or-path``); the only flag that starts with ``given``; the closest by
    spelling (``difflib``).

    Args:
        given: the unknown option as typed, e.g. ``--teacher`` or ``--kd_alpah=2``.
        options: the command's flags (dashed).

    Returns:
        One of ``options`` (dashed), or None when none is near.
    """
    key = dashed(given.split("=", 1)[0])
    known = list(dict.fromkeys(dashed(o) for o in options))
    if key in known:
        return key
    for meant in SHORT_FORMS.get(key, ()):
        if meant in known:
            return meant
    starts = [o for o in known if o.startswith(key + "-")]
    if len(starts) == 1:
        return starts[0]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return close[0] if close else (min(starts, key=len) if starts else None)


def unknown_message(extras: list[str], options: list[str]) -> str:
    """``unrecognized arguments: ...`` with a did-you-mean for the first unknown flag.

    Args:
        extras: the arguments the parser did not take.
        options: the command's flags.

    Returns:
        A one-line message.
    """
    message = f"unrecognized arguments: {' '.join(extras)}"
    flag = next((e for e in extras if e.startswith("--")), None)
    meant = did_you_mean(flag, options) if flag else None
    return message + (f"; did you mean {meant}?" if meant else "")


class OneActionPerAbbreviation:
    """A parser mixin: an abbreviation that several spellings of one flag match (``--tail`` of
    ``--tail-samples`` and ``--tail_samples``) is that flag, not an ambiguity.

    Args:
        *args: passed on to the parser class it is mixed into.
        **kwargs: passed on to the parser class it is mixed into.
    """

    def _get_option_tuples(self, option_string):
        seen, out = set(), []
        for tup in super()._get_option_tuples(option_string):
            if id(tup[0]) not in seen:
                seen.add(id(tup[0]))
                out.append(tup)
        return out


class Parser(OneActionPerAbbreviation, argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (exit 2), like every other lmkd error,
    and an abbreviation that both spellings of one flag match is that flag, not an ambiguity.

    Args:
        *args: ``argparse.ArgumentParser``'s arguments.
        **kwargs: ``argparse.ArgumentParser``'s keyword arguments.
    """

    def error(self, message):
        """Print ``message`` as one line and exit with status 2.

        Args:
            message: argparse's message.

        Returns:
            Never: it exits.
        """
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _number(kind, text: str, low, high, low_open: bool, what: str):
    value = kind(
        text
    )  # not a number: argparse's own "invalid int value: 'abc'" (these types are named so)
    if (
        math.isnan(value)
        or (low is not None and (value <= low if low_open else value < low))
        or (high is not None and value > high)
    ):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def count(low: int = 1):
    """An argparse ``type``: an integer ``>= low`` (a batch size, a number of steps or rows).

    Args:
        low: the smallest value accepted (1: a count of things; 0: may be off).

    Returns:
        A function from the flag's text to its int, raising ``ArgumentTypeError`` for a smaller one.
    """

    def parse(text: str) -> int:
        return _number(int, text, low, None, False, f"an integer >= {low}")

    parse.__name__, parse.example = "int", str(max(low, 7))
    return parse


def positive(text: str) -> float:
    """An argparse ``type``: a number > 0 (a temperature, a learning rate, a penalty).

    Args:
        text: the flag's value.

    Returns:
        It as a float.
    """
    return _number(float, text, 0.0, None, True, "a number > 0")


positive.__name__, positive.example = "float", "7"


def fraction(text: str) -> float:
    """An argparse ``type``: a probability or weight in [0, 1].

    Args:
        text: the flag's value.

    Returns:
        It as a float.
    """
    return _number(float, text, 0.0, 1.0, False, "a number in [0, 1]")


fraction.__name__, fraction.example = "float", "0.25"


def open_fraction(text: str) -> float:
    """An argparse ``type``: a share in (0, 1] (of tokens masked, of probability mass kept).

    Args:
        text: the flag's value.

    Returns:
        It as a float.
    """
    return _number(float, text, 0.0, 1.0, True, "a number in (0, 1]")


open_fraction.__name__, open_fraction.example = "float", "0.25"


def score(text: str) -> float:
    """An argparse ``type``: a score on the 0-100 scale of BLEU / chrF / ROUGE.

    Args:
        text: the flag's value.

    Returns:
        It as a float.
    """
    return _number(float, text, 0.0, 100.0, False, "a number in [0, 100]")


score.__name__, score.example = "float", "7"
