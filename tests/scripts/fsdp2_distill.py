"""Run by tests/test_multiprocess.py under torchrun: one distillation run under FSDP2 on CPU (gloo)
through the real Python API, with checks of how the teacher is handled -- or, without the last
argument, the same run in one plain process.  argv: teacher_dir student_dir data out
per_device_batch task [fsdp2]

accelerate turns FSDP on only for accelerator processes (GPU/NPU/XPU...) and trains DDP on CPU
processes; torch's FSDP2 (``fully_shard``) itself runs on CPU over gloo.  So this script tells
accelerate that its CPU processes are GPU-like processes (a process group over gloo, the device
``cpu``) and everything after that is the real path: the Trainer's FSDP2 plugin, accelerate's
``fully_shard`` of the student, lmkd's ``fully_shard`` of the teacher, the full-state-dict save."""

import os
import sys

import torch
from accelerate.state import DistributedType, PartialState
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from lmkd import DistillationConfig, DistillationTrainer
from lmkd.data.collators import collator_for
from lmkd.data.dataset import DataArguments
from lmkd.data.reading import load_data
from lmkd.data.tokenizing import tokenize
from lmkd.models.loading import load_model, load_tokenizer
from lmkd.train import processes

teacher_dir, student_dir, data, out, bs, task = sys.argv[1:7]
fsdp2 = sys.argv[7:8] == ["fsdp2"]
kind, columns = {
    "translation": ("seq2seq", ["source", "target"]),
    "causal-lm": ("causal", ["text"]),
}[task]
if fsdp2:
    os.environ["ACCELERATE_USE_FSDP"] = "true"  # what `accelerate launch` with an FSDP config sets
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
_prepare_backend = PartialState._prepare_backend


def _gloo_as_gpu(self, cpu=False, sagemaker_dp=False, backend=None):
    """A GPU-like process group over gloo, so that accelerate turns FSDP on (it does for
    MULTI_GPU processes only)."""
    backend, kind = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if backend is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "gloo", DistributedType.MULTI_GPU
    return backend, kind


PartialState._prepare_backend = _gloo_as_gpu
processes.has_accelerator = lambda: True  # the stand-in GPUs: lmkd must not set use_cpu

args = DistillationConfig(
    output_dir=out,
    per_device_train_batch_size=int(bs),
    max_steps=3,
    learning_rate=1e-3,
    kd_alpha=0.5,
    report_to="none",
    save_strategy="no",
    seed=0,
    disable_tqdm=True,
    use_cpu=not fsdp2,
    fsdp="full_shard" if fsdp2 else "",
    fsdp_config={"version": 2, "reshard_after_forward": True} if fsdp2 else None,
)
tok = load_tokenizer(student_dir)
student = load_model(student_dir, kind=kind)
teacher = load_model(teacher_dir, kind=kind)
t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
ds = tokenize(load_data(data, columns), tok, DataArguments(task=task, train_file=data))
trainer = DistillationTrainer(
    model=student,
    args=args,
    teacher_model=teacher,
    train_dataset=ds,
    processing_class=tok,
    data_collator=collator_for(task, tok, student),
)
if not fsdp2:  # the 1-process reference
    trainer.train()
    trainer.save_model(out)
    print("world_size=1 ok")
    sys.exit(0)
assert trainer.is_fsdp_enabled and trainer.accelerator.is_fsdp2
# the teacher: sharded for inference (FSDP2 units, DTensor shards), frozen, in eval mode
assert trainer.teacher is teacher and isinstance(teacher, FSDPModule)
assert all(isinstance(p, DTensor) and not p.requires_grad for p in teacher.parameters())
assert not teacher.training
world = args.world_size
shard = next(p for p in teacher.parameters() if p.dim() == 2 and p.shape[0] % world == 0)
assert shard.to_local().shape[0] == shard.shape[0] // world, "teacher not sharded"
trainer.train()
# the student: sharded by accelerate; the optimizer holds its parameters, none of the teacher's
assert isinstance(trainer.model_wrapped, FSDPModule) and trainer.model_wrapped is not teacher
optimised = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
assert optimised and not optimised & {id(p) for p in teacher.parameters()}
assert not any(p.grad is not None for p in teacher.parameters())
after = {
    k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in teacher.state_dict().items()
}
assert after.keys() == t0.keys()
assert all(torch.equal(v, after[k]) for k, v in t0.items()), "teacher changed"
trainer.save_model(out)
print(f"world_size={world} fsdp2 teacher ok")
trainer.accelerator.end_training()
