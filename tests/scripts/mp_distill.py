"""Run by tests/test_multiprocess.py under torchrun (or plainly): one distillation run through the
real Python API, with checks of how the teacher is handled under DDP.  argv: model_dir data out bs"""

import sys

import torch
from torch.nn.parallel import DistributedDataParallel

from lmkd import DistillationConfig, DistillationTrainer
from lmkd.data.collators import collator_for
from lmkd.data.dataset import DataArguments
from lmkd.data.reading import load_data
from lmkd.data.tokenizing import tokenize
from lmkd.models.loading import load_model, load_tokenizer

teacher_dir, student_dir, data, out, bs = sys.argv[1:6]
fsdp = sys.argv[6:7] == ["fsdp"]  # FSDP asked for: on CPU accelerate trains DDP instead
tok = load_tokenizer(student_dir)
student = load_model(student_dir, kind="seq2seq")
teacher = load_model(teacher_dir, kind="seq2seq")
t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
ds = tokenize(
    load_data(data, ["source", "target"]), tok, DataArguments(task="translation", train_file=data)
)
args = DistillationConfig(
    output_dir=out,
    per_device_train_batch_size=int(bs),
    max_steps=3,
    learning_rate=1e-3,
    kd_alpha=0.5,
    use_cpu=True,
    report_to="none",
    save_strategy="no",
    seed=0,
    disable_tqdm=True,
    ddp_backend="gloo" if torch.distributed.is_torchelastic_launched() else None,
    fsdp=fsdp,
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
assert not isinstance(trainer.teacher, DistributedDataParallel)
assert all(torch.equal(v, trainer.teacher.state_dict()[k]) for k, v in t0.items()), (
    "teacher changed"
)
if args.world_size > 1:
    assert isinstance(trainer.model_wrapped, DistributedDataParallel), type(trainer.model_wrapped)
trainer.save_model(out)
print(f"world_size={args.world_size} ok")
trainer.accelerator.end_training()  # destroys the process group: gloo can abort at exit without it
