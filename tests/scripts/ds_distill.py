"""Run by tests/test_multiprocess.py under torchrun: one distillation run with DeepSpeed ZeRO-2 or
ZeRO-3 on CPU (DeepSpeed's CPU accelerator, gloo) through the real Python API, with checks of how
the teacher is handled.  argv: teacher_dir student_dir data out per_device_batch zero_stage"""

import os
import sys

import deepspeed
import torch
from accelerate.state import DistributedType, PartialState
from safetensors.torch import load_file

from lmkd import DistillationConfig, DistillationTrainer
from lmkd.data.collators import collator_for
from lmkd.data.dataset import DataArguments
from lmkd.data.reading import load_data
from lmkd.data.tokenizing import tokenize
from lmkd.models.loading import load_model, load_tokenizer

_prepare_backend = PartialState._prepare_backend


def _gloo_for_deepspeed(self, cpu=False, sagemaker_dp=False, backend=None):
    """accelerate picks no backend for DeepSpeed without an accelerator; on this CPU-only test
    machine DeepSpeed's CPU accelerator runs over gloo, so give accelerate that."""
    backend, kind = _prepare_backend(self, cpu, sagemaker_dp, backend)
    if backend is None and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        return "gloo", DistributedType.MULTI_CPU
    return backend, kind


PartialState._prepare_backend = _gloo_for_deepspeed

teacher_dir, student_dir, data, out, bs, stage = sys.argv[1:7]
stage = int(stage)
ds_config = {
    "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": True},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
}
# The config first: with ZeRO-3 set up, from_pretrained partitions every model it loads (zero.Init).
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
    deepspeed=ds_config,
)
tok = load_tokenizer(student_dir)
student = load_model(student_dir, kind="seq2seq")
teacher = load_model(teacher_dir, kind="seq2seq")
# ZeRO-3 partitions the teacher at load time; under ZeRO-2 it is an ordinary full model
assert all(hasattr(p, "ds_id") == (stage == 3) for p in teacher.parameters())
ds = tokenize(
    load_data(data, ["source", "target"]), tok, DataArguments(task="translation", train_file=data)
)
trainer = DistillationTrainer(
    model=student,
    args=args,
    teacher_model=teacher,
    train_dataset=ds,
    processing_class=tok,
    data_collator=collator_for("translation", tok, student),
)
trainer.train()
assert (
    isinstance(trainer.model_wrapped, deepspeed.DeepSpeedEngine)
    and trainer.teacher is not trainer.model_wrapped
)
if stage == 3:  # its own inference engine, which gathers the partitioned weights for each forward
    assert (
        isinstance(trainer.teacher, deepspeed.DeepSpeedEngine) and trainer.teacher.module is teacher
    )
else:  # a plain frozen replica, outside every engine
    assert trainer.teacher is teacher
assert not any(p.requires_grad for p in teacher.parameters())
saved = load_file(os.path.join(teacher_dir, "model.safetensors"))
with deepspeed.zero.GatheredParameters(list(teacher.parameters()), enabled=stage == 3):
    now = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
assert saved.keys() <= now.keys(), sorted(saved.keys() - now.keys())
assert all(torch.equal(now[k], v) for k, v in saved.items()), "teacher changed"
trainer.save_model(out)
print(f"world_size={args.world_size} zero{stage} teacher ok", flush=True)
# Leave without the interpreter's teardown: with DeepSpeed's CPU accelerator a background thread of
# its communication layer occasionally aborts at exit ("terminate called without an active
# exception", ~1 run in 8 here) after all work is done and saved.
torch.distributed.barrier()
sys.stderr.flush()
os._exit(0)
