"""``python -m lmkd.study.worker SPEC OUT``: one study stage in a process of its own (see
:meth:`lmkd.study.stages.Stages.run_jobs`).  SPEC is a JSON file ``{"call", "kwargs", "threads"}`` (``call``:
the function's ``module:qualname``, :func:`lmkd.study.stages.job_ref`);
the stage writes into OUT.  A user mistake exits 2 with ``lmkd: error: ...`` as its last line."""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    """Run the stage a job spec describes (the module docstring).

    Args:
        argv: ``[SPEC, OUT]``.

    Returns:
        The exit status: 0, or 2 after a user mistake.
    """
    spec_path, out = argv
    with open(spec_path) as f:
        spec = json.load(f)
    import torch

    from lmkd.core.errors import LmkdError
    from lmkd.study.stages import call_job

    torch.set_num_threads(int(spec["threads"]))
    try:
        call_job(spec["call"], spec["kwargs"], out)
    except LmkdError as e:
        print(f"lmkd: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
