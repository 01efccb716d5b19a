"""The one exception type lmkd raises for user mistakes.

The CLI prints its message as a single line on stderr and exits with status 2 (no traceback
unless ``--debug``).  It subclasses ``ValueError`` so Python callers can catch either.
"""


class LmkdError(ValueError):
    """A user mistake: bad input, a mismatched model, a missing column.  The message says what
    is wrong and how to fix it, in one line.

    Args:
        *args: the message (one line), as for ``ValueError``.
    """
