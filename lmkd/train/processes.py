"""Several processes as the user launched them: each process of a launch joins one process group
(real data parallelism), or the run refuses in one line before any work.

What the launchers do (accelerate 1.16, torch 2.13, transformers 5.x; checked by running them):

* ``torchrun --nproc_per_node N`` starts N processes with ``WORLD_SIZE``/``LOCAL_RANK`` set.  On
  a GPU machine the Trainer joins them (NCCL).  On a machine without an accelerator the Trainer
  joins them only when ``use_cpu`` is set (accelerate's gloo group); otherwise accelerate sees
  no device backend and each process trains alone -- N identical runs writing one directory.
  :func:`settle_processes` sets ``use_cpu`` there, as a one-process run on such a machine already
  runs on the CPU.
* ``accelerate launch --cpu --num_processes N`` (or ``--num_processes N`` on a machine without
  GPUs) goes through accelerate's simple launcher: it starts **one** process, whatever N, with
  ``MASTER_ADDR`` set and no ``WORLD_SIZE`` (several CPU processes only through ``mpirun``,
  ``--mpirun_hostfile``).  :func:`settle_processes` refuses it and names the torchrun command.
* Whatever else launched several processes, :func:`check_process_group` refuses a config whose
  processes did not join one group (``world_size`` 1 with ``WORLD_SIZE`` > 1).
"""

from __future__ import annotations

import logging
import os

from lmkd.core.errors import LmkdError

logger = logging.getLogger(__name__)

#: the variables a launcher sets to the number of processes (torchrun; mpirun's three flavours)
WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

CPU_COMMAND = "torchrun --nproc_per_node N -m lmkd distill cfg.yaml"


def launched_processes(env=None) -> int:
    """How many processes the launcher says it started (1 when none says).

    Args:
        env: the environment (None: ``os.environ``).

    Returns:
        The first of :data:`WORLD_SIZE_VARS` that is set, as an int; 1 without one.
    """
    env = os.environ if env is None else env
    for name in WORLD_SIZE_VARS:
        if env.get(name, "").strip():
            try:
                return int(env[name])
            except ValueError:
                return 1
    return 1


def accelerate_started_one(env=None) -> bool:
    """Whether ``accelerate launch`` was asked for several processes and started only this one:
    its simple launcher (``--cpu``, or no GPU) sets ``MASTER_ADDR`` when ``--num_processes`` (or
    ``--num_machines``) is above 1, yet starts one process with no ``WORLD_SIZE``.

    Args:
        env: the environment (None: ``os.environ``).

    Returns:
        True in that case.
    """
    env = os.environ if env is None else env
    by_accelerate = "ACCELERATE_DYNAMO_BACKEND" in env and "ACCELERATE_USE_CPU" in env
    return (
        by_accelerate
        and bool(env.get("MASTER_ADDR"))
        and not any(env.get(n, "").strip() for n in WORLD_SIZE_VARS)
        and "LOCAL_RANK" not in env
    )


def has_accelerator() -> bool:
    """Whether this machine has a device that accelerate gives a process group to (CUDA, XPU,
    NPU, ...), decided as accelerate decides it.

    Returns:
        True when there is one; False on a CPU-only machine (or, e.g., Apple MPS).
    """
    from accelerate.utils.imports import get_distributed_backend, get_torch_accelerator_backend

    device_type, _ = get_torch_accelerator_backend()
    return get_distributed_backend(device_type) is not None


def settle_processes(config, env=None, accelerator: bool | None = None) -> None:
    """Before the Trainer sets up its devices: refuse an ``accelerate launch`` that started one
    process of several, and set ``use_cpu`` when several processes run on a machine without an
    accelerator (so the Trainer joins them in a gloo process group instead of running each alone).

    Args:
        config: the :class:`lmkd.train.config.DistillationConfig` (its ``use_cpu`` may be set).
        env: the environment (None: ``os.environ``).
        accelerator: whether the machine has an accelerator (None: :func:`has_accelerator`).

    Raises:
        LmkdError: ``accelerate launch`` started one process where several were asked for.
    """
    env = os.environ if env is None else env
    if accelerate_started_one(env):
        raise LmkdError(
            "accelerate launch started 1 process, not the --num_processes you asked for (on CPUs "
            "accelerate 1.x starts several only through mpirun); for several CPU processes run "
            f"`{CPU_COMMAND}` (see docs/multi-process.md)"
        )
    if launched_processes(env) <= 1 or config.use_cpu or config.deepspeed:
        return
    if accelerator is None:
        accelerator = has_accelerator()
    if not accelerator:
        logger.info("several processes on a machine without an accelerator: use_cpu (gloo)")
        config.use_cpu = True


def check_process_group(config, env=None) -> None:
    """After the Trainer set up its devices: refuse when the launcher started several processes
    but the Trainer did not join them in one process group -- each would train alone, all into
    one ``output_dir``.

    Args:
        config: the :class:`lmkd.train.config.DistillationConfig`, its devices set up.
        env: the environment (None: ``os.environ``).

    Raises:
        LmkdError: ``WORLD_SIZE`` (or mpirun's) says N > 1 and the config's ``world_size`` is 1.
    """
    n = launched_processes(env)
    if n > 1 and config.world_size == 1:
        raise LmkdError(
            f"{n} processes were launched but the Trainer set up no process group for them (each "
            f"would train alone into one output_dir); on CPUs run `{CPU_COMMAND}`, on GPUs "
            "`accelerate launch --config_file recipes/accelerate/ddp.yaml -m lmkd distill cfg.yaml`"
        )


def check_sharding(args, accelerator, model) -> None:
    """Once the Trainer has its accelerator: say when ``fsdp`` is set but FSDP is off, and refuse
    an FSDP2 student whose input embedding weight is shared by further modules.

    accelerate switches FSDP on only for accelerator processes (GPU/NPU/XPU...); with CPU
    processes the Trainer quietly wraps the student in DDP instead -- a warning.  Under FSDP2,
    accelerate 1.16 puts the input and output embeddings in one FSDP group and every other module
    in others, so an encoder-decoder whose encoder and decoder ``embed_tokens`` share the
    embedding weight (BART, mBART, Marian, T5 in transformers 5) sees one parameter in two groups,
    which torch 2.13 refuses at the first forward -- a one-line error before any work.

    Args:
        args: the run's :class:`lmkd.train.config.DistillationConfig`.
        accelerator: the Trainer's accelerator.
        model: the student.

    Raises:
        LmkdError: an FSDP2 student with its embedding weight shared beyond its input and output
            embeddings.
    """
    state = accelerator.state
    if args.fsdp and getattr(state, "fsdp_plugin", None) is None:
        logger.warning(
            "fsdp is set but accelerate did not enable FSDP (it does only on GPU-like devices): "
            "this run is plain data parallel (DDP), every process holding the whole student"
        )
    if not getattr(accelerator, "is_fsdp2", False):
        return
    embed = getattr(model, "get_input_embeddings", lambda: None)()
    head = getattr(model, "get_output_embeddings", lambda: None)()
    weight = getattr(embed, "weight", None)
    sharing = [
        name
        for name, module in model.named_modules(remove_duplicate=False)
        if module is not embed
        and module is not head
        and weight is not None
        and getattr(module, "weight", None) is weight
    ]
    if sharing:
        raise LmkdError(
            f"FSDP2 cannot shard this {type(model).__name__}: its embedding weight is shared by "
            f"{', '.join(sharing)}, which accelerate's FSDP2 puts in another group than the "
            "input embedding (torch refuses that); use recipes/accelerate/fsdp.yaml (FSDP1) or "
            "DeepSpeed for it"
        )
