"""Run a training script once plainly (1 process) and once under torchrun (2 CPU processes, gloo),
and compare the students they save: the check behind every "multi-process = single-process" test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPTS = Path(__file__).parent / "scripts"


def run_script(
    script: str, args: list[str], processes: int = 1, port: int = 29533, timeout: int = 300
):
    """Run ``tests/scripts/<script>`` with ``args`` in 1 process (plain python) or ``processes``
    under torchrun; assert it succeeded and return its stdout, then its stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    launcher = (
        []
        if processes == 1
        else [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(port),
        ]
    )
    done = subprocess.run(
        [sys.executable, *launcher, str(SCRIPTS / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if done.returncode != 0:  # the lines that say why, then the end of stderr
        why = [
            line
            for line in done.stderr.splitlines()
            if any(w in line for w in ("Error", "error:", "terminate", "Abort", "assert"))
        ]
        raise AssertionError(
            f"{script} exited {done.returncode}:\n"
            + "\n".join(why[-20:])
            + "\n...\n"
            + done.stderr[-2000:]
        )
    return done.stdout + "\n" + done.stderr


def assert_same_student(
    model_class, one: Path, two: Path, start: dict | None = None, atol=1e-5, rtol=1e-4
):
    """The students saved in ``one`` and ``two`` are equal within float noise (and, given the
    ``start`` state dict, both moved away from it)."""
    a = model_class.from_pretrained(one).state_dict()
    b = model_class.from_pretrained(two).state_dict()
    assert a.keys() == b.keys()
    if start is not None:
        assert any(not torch.equal(a[k], start[k]) for k in a), (
            "training did not change the student"
        )
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=rtol), k
