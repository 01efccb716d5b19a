"""Speed of models -- latency, throughput, ms per token -- and the load other processes put on the
machine while they are timed.

:func:`measure_speed` times every model with the same inputs in one run: latency per example at
batch 1, throughput at a larger batch and (seq2seq) ms per token when every model decodes the same
fixed number of tokens (greedy, batch 1), the models interleaved within each repeat (so a machine
that gets busier mid-run slows all of them alike); warm-up first, then the median of the repeats,
under ``torch.inference_mode``.  :class:`OtherLoad` measures the CPU time other processes took
meanwhile, and :func:`busy_warning` says when that makes the timings doubtful.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch

from lmkd.core.errors import LmkdError


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_speed(
    runners: dict[str, Callable[[list[str]], object]],
    inputs: Sequence[str],
    batch_size: int,
    latency_examples: int = 16,
    repeats: int = 3,
    devices: dict[str, torch.device] | None = None,
    token_runners: dict[str, Callable[[str], int]] | None = None,
    closers: dict[str, Callable[[], None]] | None = None,
) -> dict[str, dict[str, float]]:
    """Latency per example at batch 1 and throughput at ``batch_size`` for each runner.

    Every runner gets the same inputs: the first ``latency_examples`` one at a time (latency), and
    all of ``inputs`` in batches of ``batch_size`` (throughput).  One warm-up pass per runner,
    then ``repeats`` rounds in which the runners take turns; the median round is reported.

    Args:
        runners: a name to a function that processes a list of inputs (generates, classifies).
        inputs: the input texts.
        batch_size: the batch size of the throughput runs.
        latency_examples: how many of the inputs are timed one at a time.
        repeats: the timed rounds.
        devices: per name, the device to synchronise before reading the clock (CPU when absent).
        token_runners: optional, per name: decode one input to a fixed number of new tokens and return
            that number (:func:`lmkd.models.generation.generate_fixed_length`); timed in the same rounds
            on the latency inputs, they give ``ms_per_token`` -- the decoding speed of the
            architecture, independent of how long the model's own outputs are -- and
            ``fixed_new_tokens``.
        closers: optional, per name: release a runner's engine after each of its turns, warm-up
            included (:meth:`lmkd.models.engines.base.Engine.close`: a live CTranslate2 translator
            slows the PyTorch models timed beside it); its next turn opens it again with one untimed
            call.

    Returns:
        Per name: ``latency_ms``, ``throughput_per_s``, the batch sizes and example counts, ``repeats``,
        ``other_cpu_load`` (:class:`OtherLoad` over the whole measurement), ``cpus``, and with a token
        runner ``ms_per_token`` and ``fixed_new_tokens``.

    Raises:
        LmkdError: ``repeats`` below 1, or no inputs.
    """
    if repeats < 1 or not inputs:
        raise LmkdError("speed needs at least one repeat and one input example")
    inputs = [str(x) for x in inputs]
    single = inputs[: max(1, latency_examples)]
    batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
    devices = devices or {}
    token_runners = token_runners or {}
    closers = closers or {}
    busy = OtherLoad()
    lat: dict[str, list[float]] = {k: [] for k in runners}
    thr: dict[str, list[float]] = {k: [] for k in runners}
    per_tok: dict[str, list[float]] = {k: [] for k in token_runners}
    fixed: dict[str, int] = {}
    with torch.inference_mode(), busy:
        for name, run in runners.items():  # warm-up: kernels, allocator, caches
            dev = devices.get(name, torch.device("cpu"))
            run(single[:1])
            run(batches[0])
            if name in token_runners:
                fixed[name] = token_runners[name](single[0])
            _sync(dev)
            if name in closers:
                closers[name]()
        for _ in range(repeats):
            for name, run in runners.items():
                dev = devices.get(name, torch.device("cpu"))
                if name in closers:  # open the engine again, untimed
                    run(single[:1])
                _sync(dev)
                t0 = time.perf_counter()
                for x in single:
                    run([x])
                _sync(dev)
                lat[name].append((time.perf_counter() - t0) / len(single))
                t0 = time.perf_counter()
                for b in batches:
                    run(b)
                _sync(dev)
                thr[name].append(len(inputs) / (time.perf_counter() - t0))
                if name in token_runners:
                    t0 = time.perf_counter()
                    tokens = sum(token_runners[name](x) for x in single)
                    _sync(dev)
                    per_tok[name].append((time.perf_counter() - t0) / max(tokens, 1))
                if name in closers:
                    closers[name]()
    out: dict[str, dict[str, float]] = {}
    for name in runners:
        out[name] = {
            "latency_ms": 1000.0 * statistics.median(lat[name]),
            "throughput_per_s": statistics.median(thr[name]),
            "latency_batch_size": 1,
            "throughput_batch_size": batch_size,
            "latency_examples": len(single),
            "throughput_examples": len(inputs),
            "repeats": repeats,
            "other_cpu_load": busy.fraction,
            "cpus": os.cpu_count(),
        }
        if name in token_runners:
            out[name]["ms_per_token"] = 1000.0 * statistics.median(per_tok[name])
            out[name]["fixed_new_tokens"] = fixed[name]
    return out


#: above this share of the machine's cores used by other processes, timings are flagged as unreliable
BUSY_MACHINE = 0.15


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes of this machine have spent busy since boot (Linux ``/proc/stat``).

    Returns:
        The seconds, or None where the counters cannot be read.
    """
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class OtherLoad:
    """Context manager: how much CPU *other* processes used while the block ran.

    A timing taken while other work ran is not the model's speed: :func:`measure_speed` records it,
    and the reports flag figures above :data:`BUSY_MACHINE`.

    Attributes:
        fraction: after the block, the share of all the machine's cores other processes used (0 =
            nothing else ran, 1 = every core busy elsewhere); None where the machine's counters cannot
            be read.
    """

    fraction: float | None = None

    def __enter__(self):
        self._t, self._own, self._busy = (
            time.perf_counter(),
            time.process_time(),
            busy_cpu_seconds(),
        )
        return self

    def __exit__(self, *exc):
        wall, own, busy = (
            time.perf_counter() - self._t,
            time.process_time() - self._own,
            busy_cpu_seconds(),
        )
        if self._busy is None or busy is None or wall <= 0:
            self.fraction = None
        else:
            # (the counters tick in 10 ms jiffies: a short block can read a little past the bounds)
            self.fraction = min(
                1.0, max(0.0, (busy - self._busy - own) / (wall * (os.cpu_count() or 1)))
            )
        return False


def busy_warning(speed: dict) -> str | None:
    """The line a report prints when a model was timed on a busy machine.

    Args:
        speed: one model's :func:`measure_speed` figures.

    Returns:
        The warning when other processes used more than :data:`BUSY_MACHINE` of the cores while it
        was timed; None otherwise.
    """
    load = speed.get("other_cpu_load")
    if load is None or load <= BUSY_MACHINE:
        return None
    return (
        f"**Speed measured on a busy machine**: other processes used {load:.0%} of the {speed.get('cpus')} "
        "cores while the models were timed, so the speed columns are not reliable; time them again on an "
        "idle machine."
    )
