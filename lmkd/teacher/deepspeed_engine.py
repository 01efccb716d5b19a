"""DeepSpeed ZeRO-3 and the teacher: whether a run's DeepSpeed config partitions parameters
(:func:`zero3_enabled`), and the teacher's own DeepSpeed inference engine under ZeRO-3
(:func:`deepspeed_teacher`), which :func:`lmkd.teacher.frozen.load_frozen_teacher` wraps it in.

DeepSpeed itself is imported only when an engine is built.
"""

from __future__ import annotations

import copy
import logging

from lmkd.models.loading import unwrap

logger = logging.getLogger(__name__)


def zero3_enabled(deepspeed_config: dict | None) -> bool:
    """Whether a DeepSpeed config (None: no DeepSpeed) partitions parameters (ZeRO stage 3).

    Args:
        deepspeed_config: the DeepSpeed config as a dict, or None.

    Returns:
        True under ZeRO stage 3.
    """
    if deepspeed_config is None:
        return False
    return int(deepspeed_config.get("zero_optimization", {}).get("stage", 0)) == 3


def deepspeed_teacher(teacher, deepspeed_config: dict):
    """Wrap the teacher in a DeepSpeed engine of its own -- ZeRO-3, no optimizer.

    Under ZeRO-3, ``from_pretrained`` builds every model partitioned (``zero.Init``), the teacher
    included, so a plain forward would see empty weights.  The engine's forward gathers each
    layer's parameters just in time and frees them after, as DeepSpeed inference and TRL's
    ``prepare_deepspeed`` do.  The engine is never the Trainer's model: not in the optimizer, not
    saved.  (Under ZeRO-1/2 the teacher is an ordinary full replica and stays unwrapped.)

    Args:
        teacher: the (partitioned) teacher model.
        deepspeed_config: the run's ZeRO-3 config (copied; its training-only and ``auto``
            entries are dropped, its bucket sizes derived from the teacher's width).

    Returns:
        The DeepSpeed engine, in eval mode with gradients off.
    """
    import deepspeed

    config = copy.deepcopy(deepspeed_config)
    for key in (
        "optimizer",
        "scheduler",
    ):  # training-only; an engine without them optimises nothing
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    for key in ("offload_optimizer", "stage3_gather_16bit_weights_on_model_save"):
        zero.pop(key, None)
    cfg = unwrap(teacher).config
    hidden = getattr(
        cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg, "hidden_size", None
    )
    if isinstance(
        hidden, int
    ):  # the values the Trainer derives for the student, from the teacher's width
        zero.update(
            reduce_bucket_size=hidden * hidden,
            stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
            stage3_param_persistence_threshold=10 * hidden,
        )

    def settle(
        node,
    ):  # "auto" values left are the Trainer's to fill for the student: DeepSpeed defaults here
        for k in [k for k, v in node.items() if v == "auto"]:
            del node[k]
        for v in node.values():
            if isinstance(v, dict):
                settle(v)

    settle(config)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    engine.requires_grad_(False)
    logger.info(
        "DeepSpeed ZeRO-3: the teacher runs in its own inference engine (parameters partitioned, "
        "gathered layer by layer for its forward)"
    )
    return engine
