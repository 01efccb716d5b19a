"""torch.compile for the per-chunk closed forms of :mod:`lmkd.losses.chunked`, guarded: compiled on
CUDA GPUs that Inductor/Triton support (compute capability >= 7.0, triton installed), eager on CPU,
on older GPUs and on other accelerators, and eager for good after a compile that fails (logged once).

This module imports torch only.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

logger = logging.getLogger(__name__)


def compilable(device: torch.device) -> bool:
    """Whether torch.compile (Inductor/Triton) can run the per-chunk functions on ``device``.

    Args:
        device: where the chunk's tensors are.

    Returns:
        True on a CUDA GPU of compute capability 7.0 or above with Triton installed.
    """
    if (
        device.type != "cuda"
        or not hasattr(torch, "compile")
        or importlib.util.find_spec("triton") is None
    ):
        return False
    return torch.cuda.get_device_capability(device) >= (7, 0)


class Compiled:
    """``fn`` compiled on first use on a capable CUDA GPU, eager everywhere else; a compile that
    fails is logged once and ``fn`` runs eagerly from then on (its inputs are never modified in place).
    Called as ``fn(s, *args)``; ``s``'s device decides (:func:`compilable`).

    Args:
        fn: the per-chunk function.
    """

    def __init__(self, fn):
        self.fn, self.compiled, self.broken = fn, None, False

    def __call__(self, s, *args):
        if self.broken or not compilable(s.device):
            return self.fn(s, *args)
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=True)  # the last chunk is shorter
        try:
            return self.compiled(s, *args)
        except Exception as e:  # noqa: BLE001 -- any compiler failure: the eager function is exact
            self.broken = True
            logger.warning(
                "torch.compile of the chunked KD loss failed (%s: %s); running it eagerly",
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
            )
            return self.fn(s, *args)
