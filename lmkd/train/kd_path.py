"""``kd_chunk_size: auto``: the plain or the chunked KD path, from the full logits' size and free memory.

:func:`choose_kd_path` is what :meth:`lmkd.train.objective.DistillationObjective.decide_path` asks,
once, on the first batch.
"""

from __future__ import annotations

import torch

#: the plain path's peak extra memory in (N, V) float32 tensors: both models' logits, their softmaxes
#: and the gradient (benchmarks/bench_memory.py measured ~11 at N = 1024, V = 64k)
PLAIN_PEAK_LOGITS = 12
#: ``kd_chunk_size: auto`` takes the plain path when that peak is at most this share of free memory
FIT_SHARE = 0.5


def choose_kd_path(
    positions: int, vocab: int, device, free_bytes: int | None = None
) -> tuple[int, str]:
    """The kd_chunk_size that ``kd_chunk_size: auto`` stands for.

    0 (the plain loss, fastest on GPUs) when its full logits fit comfortably in ``free_bytes``
    (:data:`FIT_SHARE` of it, the peak taken as :data:`PLAIN_PEAK_LOGITS` (N, V) float32 tensors),
    else -1 (chunked/fused, automatic chunk size).  On CPU always -1: there the chunked/fused loss is
    measured faster than the plain one as well as leaner (benchmarks/results/bench_cpu.txt); on a
    device whose free memory is unknown, -1 too.

    Args:
        positions: the positions (N) the KD term is taken over in one micro-batch.
        vocab: the vocabulary size (V).
        device: the device the loss runs on.
        free_bytes: its free memory (None: asked of a CUDA device).

    Returns:
        (kd_chunk_size, the line to log).
    """
    need = PLAIN_PEAK_LOGITS * positions * vocab * 4

    def gb(x):
        return f"{x / 2**30:.1f} GB"

    dev = torch.device(device)
    if dev.type == "cpu":
        return (
            -1,
            f"kd path: chunked (on CPU it is faster than the plain loss; full logits would take {gb(need)})",
        )
    if free_bytes is None and dev.type == "cuda":
        free_bytes = torch.cuda.mem_get_info(dev)[0]
    if free_bytes is None:
        return (
            -1,
            f"kd path: chunked (free memory of a {dev.type} device unknown; full logits {gb(need)})",
        )
    if need <= FIT_SHARE * free_bytes:
        return 0, f"kd path: plain (full logits {gb(need)} of {gb(free_bytes)} free)"
    return (
        -1,
        f"kd path: chunked (full logits {gb(need)} would not fit comfortably in {gb(free_bytes)} free)",
    )
