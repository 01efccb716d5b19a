"""stdout for the commands that print their result as JSON (``distill``, ``generate``,
``cache-logits``): exactly one JSON document, so that ``lmkd distill ... | jq`` works.

While the command works, whatever prints to stdout -- the Trainer's per-step log dicts, a progress
bar's ``tqdm.write`` -- goes to stderr instead (:func:`work_on_stderr`); the result is printed last
with :func:`print_json`.
"""

from __future__ import annotations

import contextlib
import json
import sys


@contextlib.contextmanager
def work_on_stderr():
    """Send what the block prints to stdout to stderr, keeping stdout for the result.

    Returns:
        A context manager.
    """
    with contextlib.redirect_stdout(sys.stderr):
        yield


def print_json(obj) -> None:
    """Print ``obj`` on stdout as one indented JSON document (keys sorted).

    Args:
        obj: a JSON-able object.

    Returns:
        None.
    """
    print(json.dumps(obj, indent=1, sort_keys=True), flush=True)
