"""Distillation losses: pure functions over tensors (torch only; nothing of models or trainers).

* :mod:`lmkd.losses.token` -- token-level KD: forward/reverse KL with temperature, generalized JSD,
  logit MSE, hard-label CE, masking.
* :mod:`lmkd.losses.feature` -- hidden-state, attention, hint and relation (RKD, SP) losses.
* :mod:`lmkd.losses.chunked` -- memory-lean chunked and fused-linear CE+KD, cached top-K teachers;
  same values and gradients as the plain losses.

Every public name of the three is importable from ``lmkd.losses``; the conventions (sums over
positions, float32 softmaxes, tau^2 scaling) are written in :mod:`lmkd.losses.token`.
"""

from .chunked import (  # noqa: F401
    TOPK_KD_LOSSES,
    Head,
    LazyLogits,
    TopK,
    auto_chunk_size,
    chunked_cross_entropy,
    chunked_distill_loss,
    chunked_kd_loss,
    fused_linear_distill_loss,
    topk_kd_loss,
)
from .feature import *  # noqa: F401,F403
from .token import *  # noqa: F401,F403
from .token import IGNORE_INDEX, KD_LOSSES  # noqa: F401
