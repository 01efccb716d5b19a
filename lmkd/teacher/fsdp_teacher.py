"""FSDP2 and the teacher: under FSDP2 (``fsdp_version: 2``) the local teacher is sharded for
inference with ``fully_shard`` -- one unit per transformer layer (the model's
``_no_split_modules``) and the root -- so no process holds the whole teacher: each layer's weights
are all-gathered for its forward and freed after it (``reshard_after_forward``).  It is never the
Trainer's model: no optimizer, no gradients, never saved.  (Under FSDP1 the teacher stays a full
frozen copy on every process.)

Every process must run the sharded teacher's forward the same number of times (each forward is a
collective); :class:`lmkd.train.DistillationTrainer` does -- one teacher forward per micro-batch on
every process.
"""

from __future__ import annotations

from torch import nn


def fsdp2_enabled(accelerator) -> bool:
    """Whether an accelerate ``Accelerator`` runs FSDP2.

    Args:
        accelerator: the Trainer's accelerator (None: no accelerator).

    Returns:
        True under FSDP with ``fsdp_version`` 2.
    """
    return accelerator is not None and bool(getattr(accelerator, "is_fsdp2", False))


def teacher_members(teacher: nn.Module) -> list[nn.Module]:
    """The models a teacher is made of: the members of an ensemble, or the teacher itself.

    Args:
        teacher: a teacher model or :class:`lmkd.teacher.ensemble.EnsembleTeacher`.

    Returns:
        The models to shard one by one.
    """
    members = getattr(teacher, "teachers", None)
    return list(members) if isinstance(members, nn.ModuleList) else [teacher]


def shard_teacher(teacher: nn.Module, mesh=None) -> nn.Module:
    """Shard a frozen teacher with FSDP2's ``fully_shard`` for inference, in place.

    Each module whose class the model names in ``_no_split_modules`` (its transformer layers)
    becomes one FSDP unit; the root holds the rest (embeddings, tied heads).  Parameters become
    ``DTensor`` shards; ``requires_grad`` stays off and the model stays in ``eval()``.

    Args:
        teacher: the frozen teacher (already on its device, in its dtype, in eval mode).
        mesh: the ``DeviceMesh`` to shard over (None: FSDP2's default, all processes).

    Returns:
        The same module, sharded.
    """
    from torch.distributed.fsdp import fully_shard

    for member in teacher_members(teacher):
        layers = set(getattr(member, "_no_split_modules", None) or ())
        units = [m for m in member.modules() if m is not member and type(m).__name__ in layers]
        for unit in units:
            fully_shard(unit, mesh=mesh, reshard_after_forward=True)
        fully_shard(member, mesh=mesh, reshard_after_forward=True)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def fsdp_mesh(accelerator):
    """The device mesh the student is sharded over, for the teacher to use too.

    Args:
        accelerator: the Trainer's accelerator.

    Returns:
        accelerate's FSDP sub-mesh, or None (FSDP2's default mesh over all processes).
    """
    mesh = getattr(accelerator, "torch_device_mesh", None)
    config = getattr(accelerator, "parallelism_config", None)
    if mesh is None or config is None:
        return None
    return mesh[tuple(config.fsdp_dim_names)]
