"""The size of a model: distinct parameters (:func:`count_parameters`) and the bytes of the weight
files ``from_pretrained`` loads (:func:`weights_bytes`) -- the size metrics of evaluate, compress and
study.
"""

from __future__ import annotations

import os

import torch


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied weights counted once): the size metric of evaluate and study.

    Args:
        model: the model.

    Returns:
        The number of parameters.
    """
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def weights_bytes(path: str) -> int | None:
    """Bytes of the weights ``from_pretrained`` loads from a saved model directory.

    Other files (tokenizer, checkpoints, ``round-*``/``member-*`` runs in subfolders) are not counted.

    Args:
        path: a saved model directory, or a hub id.

    Returns:
        The size of the top-level ``model.safetensors`` (else ``pytorch_model.bin``), or of the shards
        its index file lists; None for a hub id or a directory without weights.
    """
    import json

    from transformers.utils import (
        SAFE_WEIGHTS_INDEX_NAME,
        SAFE_WEIGHTS_NAME,
        WEIGHTS_INDEX_NAME,
        WEIGHTS_NAME,
    )

    if not os.path.isdir(path):
        return None
    for single, index in (
        (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME),
        (WEIGHTS_NAME, WEIGHTS_INDEX_NAME),
    ):
        if os.path.isfile(os.path.join(path, single)):
            return os.path.getsize(os.path.join(path, single))
        index_path = os.path.join(path, index)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                shards = sorted(set(json.load(f).get("weight_map", {}).values()))
            return sum(
                os.path.getsize(os.path.join(path, s))
                for s in shards
                if os.path.isfile(os.path.join(path, s))
            )
    return None
