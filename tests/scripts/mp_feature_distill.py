"""Run by tests/test_feature_trainer.py under torchrun (or plainly): feature distillation with a hint
projection (student narrower than the teacher) through the real Python API; saves the student and
the projections.  argv: teacher_dir student_dir data out per_device_batch_size"""

import os
import sys

import torch

from lmkd import DistillationConfig, DistillationTrainer
from lmkd.data.collators import collator_for
from lmkd.data.dataset import DataArguments
from lmkd.data.reading import load_data
from lmkd.data.tokenizing import tokenize
from lmkd.models.loading import load_model, load_tokenizer

teacher_dir, student_dir, data, out, bs = sys.argv[1:6]
tok = load_tokenizer(student_dir)
student = load_model(student_dir, kind="seq2seq")
teacher = load_model(teacher_dir, kind="seq2seq")
ds = tokenize(
    load_data(data, ["source", "target"]), tok, DataArguments(task="translation", train_file=data)
)
args = DistillationConfig(
    output_dir=out,
    per_device_train_batch_size=int(bs),
    max_steps=3,
    learning_rate=1e-2,
    kd_alpha=0.5,
    hidden_weight=1.0,
    attention_weight=1.0,
    use_cpu=True,
    report_to="none",
    save_strategy="no",
    seed=0,
    disable_tqdm=True,
    optim="sgd",
    max_grad_norm=0.0,
    ddp_backend="gloo" if torch.distributed.is_torchelastic_launched() else None,
)
trainer = DistillationTrainer(
    model=student,
    args=args,
    teacher_model=teacher,
    train_dataset=ds,
    processing_class=tok,
    data_collator=collator_for("translation", tok, student),
)
assert len(trainer.projections) == 2
torch.manual_seed(0)  # the same projection init in every process and run
trainer.projections.load_state_dict(
    {k: 0.1 * torch.randn_like(v) for k, v in trainer.projections.state_dict().items()}
)
trainer.train()
trainer.save_model(out)
if trainer.is_world_process_zero():
    torch.save(trainer.projections.state_dict(), os.path.join(out, "projections.pt"))
print(f"world_size={args.world_size} ok")
trainer.accelerator.end_training()  # destroys the process group: gloo can abort at exit without it
