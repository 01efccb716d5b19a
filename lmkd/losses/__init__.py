"""Distillation losses: pure functions over tensors (torch only; nothing of models or trainers).

* :mod:`lmkd.losses.token` -- token-level KD: forward/reverse KL with temperature, generalized JSD,
  skew KL / skew reverse KL (DistiLLM), TAID's interpolated target and its schedule, logit MSE,
  hard-label CE, masking.
* :mod:`lmkd.losses.feature` -- hidden-state, attention, hint and relation (RKD, SP) losses.
* :mod:`lmkd.losses.topk` -- KD against a cached top-K teacher (K + 1 buckets, sampled tails).
* :mod:`lmkd.losses.uld` -- cross-tokenizer KD: ULD (sorted-probability L1) and its hybrid with the
  exact KL over shared tokens.
* :mod:`lmkd.losses.chunked` -- memory-lean chunked CE+KD (full or top-K teachers); same values and
  gradients as the plain losses.
* :mod:`lmkd.losses.fused` -- the chunked loss with the LM head run per chunk (fused-linear CE+KD).

Every public name of the six is importable from ``lmkd.losses``; the conventions (sums over
positions, float32 softmaxes, tau^2 scaling) are written in :mod:`lmkd.losses.token`.
"""

from lmkd.losses.chunked import (
    Head,
    LazyLogits,
    auto_chunk_size,
    chunked_cross_entropy,
    chunked_distill_loss,
    chunked_kd_loss,
)
from lmkd.losses.feature import *
from lmkd.losses.fused import fused_linear_distill_loss
from lmkd.losses.token import *
from lmkd.losses.token import (
    IGNORE_INDEX,
    KD_LOSSES,
    PLAIN_KD_LOSSES,
    TaidSchedule,
    at_least_float32,
)
from lmkd.losses.topk import TOPK_KD_LOSSES, TopK, topk_kd_loss
from lmkd.losses.uld import CROSS_KD_LOSSES, cross_kd_loss, sorted_l1, uld_hybrid_loss, uld_loss
