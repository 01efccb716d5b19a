"""Distillation losses: pure functions over tensors (torch only; nothing of models or trainers).

* :mod:`lmkd.losses.token` -- token-level KD: forward/reverse KL with temperature, generalized JSD,
  logit MSE, hard-label CE, any KD loss by name.
* :mod:`lmkd.losses.skew_taid` -- skew KL / skew reverse KL (DistiLLM), TAID's interpolated target
  and its schedule.
* :mod:`lmkd.losses.rows` -- masks, the float32 up-cast, row-wise KL and mixtures in log space.
* :mod:`lmkd.losses.feature` -- hidden-state, attention and hint losses.
* :mod:`lmkd.losses.relation` -- relation losses (RKD, SP).
* :mod:`lmkd.losses.topk` -- KD against a cached top-K teacher (K + 1 buckets, sampled tails), and
  a top-K teacher rebuilt over its whole vocabulary (:func:`dense_logprobs`).
* :mod:`lmkd.losses.uld` -- cross-tokenizer KD: ULD (sorted-probability L1) and its hybrid with the
  exact KL over shared tokens.
* :mod:`lmkd.losses.chunked` -- memory-lean chunked CE+KD (full or top-K teachers); same values and
  gradients as the plain losses.
* :mod:`lmkd.losses.chunk_forms` -- the chunks of a chunked pass (their size, the positions they
  skip) and the closed-form loss and gradient of one chunk.
* :mod:`lmkd.losses.fused` -- the chunked loss with the LM head run per chunk (fused-linear CE+KD).

Every public name of these modules is importable from ``lmkd.losses``; the conventions (sums over
positions, float32 softmaxes, tau^2 scaling) are written in :mod:`lmkd.losses.token`.
"""

from lmkd.losses.chunk_forms import auto_chunk_size
from lmkd.losses.chunked import (
    Head,
    LazyLogits,
    chunked_cross_entropy,
    chunked_distill_loss,
    chunked_kd_loss,
)
from lmkd.losses.feature import *
from lmkd.losses.fused import fused_linear_distill_loss
from lmkd.losses.relation import *
from lmkd.losses.rows import *
from lmkd.losses.rows import at_least_float32
from lmkd.losses.skew_taid import *
from lmkd.losses.skew_taid import TaidSchedule
from lmkd.losses.token import *
from lmkd.losses.token import IGNORE_INDEX, KD_LOSSES, PLAIN_KD_LOSSES
from lmkd.losses.topk import TOPK_KD_LOSSES, TopK, dense_logprobs, topk_kd_loss
from lmkd.losses.uld import CROSS_KD_LOSSES, cross_kd_loss, sorted_l1, uld_hybrid_loss, uld_loss
