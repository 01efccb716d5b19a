"""Structured pruning of a trained model: attention heads by importance, and whole layers.

transformers 5 removed ``PreTrainedModel.prune_heads`` (and ``config.pruned_heads``), so lmkd
removes heads itself by slicing each attention's query/key/value rows and output-projection
columns.  A pruned model must still load with plain ``from_pretrained``, so every attention module
keeps the same number of heads and the config says how many.  That is possible only where the config
holds the head size apart from the hidden size -- T5 / mT5 (``d_kv``, ``num_heads``); BART, Marian,
BERT and GPT-2 derive the head size from ``hidden / heads``, so a model of theirs with fewer heads
of the same size cannot be written down as a config, and lmkd refuses (drop layers instead:
:func:`lmkd.models.student.make_student`).

Head importance is Michel et al. (2019)'s: ``I_h = sum over batches |dL/d xi_h|``, the loss's
sensitivity to a gate ``xi_h`` on head ``h``'s output.  Scaling head ``h``'s output by ``xi`` is
scaling its columns of the output projection, so ``dL/d xi_h = sum(W_o[:, h] * dL/dW_o[:, h])`` --
read off ordinary weight gradients, no gates in the model.  T5 shares one relative position bias
(computed in each stack's first block) across the self-attention of that stack, so those modules keep
the same head indices (chosen by their summed importance); each cross-attention chooses its own.
"""

from __future__ import annotations

import logging

import torch

from lmkd.core.errors import LmkdError
from lmkd.models.loading import unwrap

logger = logging.getLogger(__name__)

#: model types whose attention heads lmkd can remove (the config holds the head size: d_kv)
HEAD_PRUNABLE = ("t5", "mt5")


def check_head_pruning(config, remove: int) -> None:
    """One line, before any work, when ``remove`` heads cannot be removed from every attention of
    a model of ``config``.

    Args:
        config: the model's config (``model_type``, ``num_heads``).
        remove: heads to remove per attention module (``--prune-heads``; 0 removes none).

    Raises:
        LmkdError: ``remove`` is negative, the model type's heads cannot be pruned (not
            T5 / mT5), or ``remove`` would leave no head.
    """
    if remove < 0:
        raise LmkdError(f"--prune-heads must be >= 0, got {remove}")
    if remove == 0:
        return
    if config.model_type not in HEAD_PRUNABLE:
        raise LmkdError(
            f"cannot prune attention heads of a {config.model_type!r} model: transformers 5 has no "
            "prune_heads, and its config ties the head size to hidden size / heads, so a model with "
            f"fewer heads would not load again (lmkd prunes heads of {', '.join(HEAD_PRUNABLE)}); "
            "drop layers instead (--encoder-layers / --decoder-layers / --layers)"
        )
    heads = config.num_heads
    if remove >= heads:
        raise LmkdError(
            f"--prune-heads {remove} would remove every head: each attention layer has {heads}; "
            f"remove at most {heads - 1}"
        )


def attention_groups(model) -> dict[str, list[tuple[str, torch.nn.Module]]]:
    """T5 attention modules grouped by the head indices they must share: one group per stack's
    self-attention (the shared relative position bias), one per cross-attention.

    Args:
        model: a T5-family model (wrapped or not).

    Returns:
        Group name (``encoder.self`` / ``decoder.self`` / a cross-attention's module name) -> its
        ``(name, module)`` pairs.

    Raises:
        LmkdError: the model has no T5 attention modules.
    """
    model = unwrap(model)
    groups: dict[str, list[tuple[str, torch.nn.Module]]] = {}
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Attention") and hasattr(module, "key_value_proj_dim"):
            stack = (
                "decoder" if ".decoder." in f".{name}" or name.startswith("decoder") else "encoder"
            )
            group = f"{stack}.self" if name.endswith("SelfAttention") else name
            groups.setdefault(group, []).append((name, module))
    if not groups:
        raise LmkdError(f"found no T5 attention modules in {type(model).__name__}")
    return groups


def head_importance(model, batches) -> dict[str, torch.Tensor]:
    """Per attention module (by name), the importance of each head over ``batches``:
    ``sum |sum(W_o[:, h] * grad)|``.

    The model runs in eval mode (no dropout) and its gradients are cleared afterwards.

    Args:
        model: a T5-family model.
        batches: dicts of tensors with ``labels``, on the model's device.

    Returns:
        Module name -> a float64 ``(n_heads,)`` tensor of importances.
    """
    model = unwrap(model)
    modules = {n: m for g in attention_groups(model).values() for n, m in g}
    scores = {n: torch.zeros(m.n_heads, dtype=torch.float64) for n, m in modules.items()}
    was_training = model.training
    model.eval()  # no dropout: the sensitivity of the model that will be served
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            with torch.no_grad():
                for n, m in modules.items():
                    w, g = m.o.weight, m.o.weight.grad
                    per_head = (
                        (w * g).reshape(w.shape[0], m.n_heads, m.key_value_proj_dim).sum(dim=(0, 2))
                    )
                    scores[n] += per_head.abs().double().cpu()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return scores


def _keep_heads(module, keep: list[int]) -> None:
    d = module.key_value_proj_dim
    rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in keep]).to(module.q.weight.device)
    for lin in (module.q, module.k, module.v):
        lin.weight = torch.nn.Parameter(lin.weight.data.index_select(0, rows).clone())
        lin.out_features = len(rows)
    module.o.weight = torch.nn.Parameter(module.o.weight.data.index_select(1, rows).clone())
    module.o.in_features = len(rows)
    if getattr(module, "has_relative_attention_bias", False):
        bias = module.relative_attention_bias
        idx = torch.tensor(keep, device=bias.weight.device)
        bias.weight = torch.nn.Parameter(bias.weight.data.index_select(1, idx).clone())
        bias.embedding_dim = len(keep)
    module.n_heads = len(keep)
    module.inner_dim = len(keep) * d


def prune_heads(model, remove: int, importance: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Remove the ``remove`` least important heads from every attention module of a T5-family
    ``model``, in place; set ``config.num_heads`` (and ``config.lmkd_pruned_heads``).

    Args:
        model: a T5-family model.
        remove: heads to remove per attention module.
        importance: per module, its heads' importance (:func:`head_importance`); a group that
            shares heads keeps those with the highest summed importance.

    Returns:
        The kept head indices per module (empty when ``remove`` is 0).

    Raises:
        LmkdError: as :func:`check_head_pruning`.
    """
    model = unwrap(model)
    check_head_pruning(model.config, remove)
    kept: dict[str, list[int]] = {}
    if remove == 0:
        return kept
    keep_n = model.config.num_heads - remove
    for group in attention_groups(model).values():
        total = sum(importance[n] for n, _ in group)
        keep = sorted(torch.argsort(total, descending=True, stable=True)[:keep_n].tolist())
        for name, module in group:
            _keep_heads(module, keep)
            kept[name] = keep
    model.config.num_heads = keep_n
    model.config.lmkd_pruned_heads = {"removed_per_layer": remove, "kept": kept}
    return kept
