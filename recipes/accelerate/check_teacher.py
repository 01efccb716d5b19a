"""Check, under an accelerate config, that the teacher is handled as lmkd promises -- before a long run.

    accelerate launch --config_file recipes/accelerate/fsdp.yaml recipes/accelerate/check_teacher.py \
        --teacher facebook/bart-large-cnn --student students/distilbart-cnn-12-3 \
        --data data/cnn_dm/validation.jsonl --task summarization --source-column article --target-column highlights

Runs a few DistillationTrainer steps on the first rows of --data and asserts on every process that
the teacher is not wrapped for training (DDP/FSDP/the student's DeepSpeed engine), holds real (not
partitioned or meta) weights, has no gradients, is unchanged by training and is identical on every
process; prints one line per process and exits non-zero if any check fails.  Under DeepSpeed ZeRO-3
the teacher is expected partitioned inside an inference engine of its own, and under FSDP2 sharded
for inference (every parameter a DTensor shard); their weights are gathered for the checksum.
"""

import argparse
import contextlib
import hashlib

import torch
from torch.distributed.tensor import DTensor
from transformers import PreTrainedModel

from lmkd import DistillationConfig, DistillationTrainer
from lmkd.core.constants import TASK_KIND
from lmkd.data.collators import collator_for
from lmkd.data.dataset import DataArguments
from lmkd.data.reading import load_data
from lmkd.data.tokenizing import tokenize
from lmkd.models.loading import load_model, load_tokenizer, unwrap


def checksum(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        p = p.full_tensor() if isinstance(p, DTensor) else p  # FSDP2: gathered from every process
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--teacher", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--task", default="translation")
    p.add_argument("--source-column")
    p.add_argument("--target-column")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--output", default="runs/check_teacher")
    p.add_argument("--bf16", action="store_true")
    a = p.parse_args()

    data_args = DataArguments(
        task=a.task, train_file=a.data, source_column=a.source_column, target_column=a.target_column
    )
    # The config first: under DeepSpeed ZeRO-3, from_pretrained then partitions the models it loads.
    args = DistillationConfig(
        output_dir=a.output,
        teacher_model_name_or_path=a.teacher,
        kd_alpha=0.5,
        per_device_train_batch_size=4,
        max_steps=a.steps,
        learning_rate=1e-4,
        report_to="none",
        save_strategy="no",
        bf16=a.bf16,
        disable_tqdm=True,
    )
    tok = load_tokenizer(a.student)
    student = load_model(a.student, kind=TASK_KIND[a.task])
    ds = load_data(a.data, [data_args.source_column, data_args.target_column])
    ds = tokenize(ds.select(range(min(64, len(ds)))), tok, data_args)
    trainer = DistillationTrainer(
        model=student,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        data_collator=collator_for(a.task, tok, student),
    )
    zero3 = trainer.zero3
    fsdp2 = trainer.accelerator.is_fsdp2  # the teacher sharded for inference
    teacher = unwrap(trainer.teacher)

    def whole():  # ZeRO-3: gather the partitioned weights for reading
        if not zero3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(teacher.parameters()))

    with whole():
        before = checksum(teacher)
    trainer.train()
    rank, world = args.process_index, args.world_size
    problems = []
    if not isinstance(teacher, PreTrainedModel):
        problems.append(f"teacher is not a transformers model: {type(teacher).__name__}")
    if trainer.teacher is trainer.model_wrapped or (not zero3 and trainer.teacher is not teacher):
        problems.append(f"teacher is wrapped: {type(trainer.teacher).__name__}")
    params = list(teacher.parameters())
    if any(p.requires_grad for p in params):
        problems.append("teacher has parameters with requires_grad")
    if fsdp2 and not all(isinstance(p, DTensor) for p in params):
        problems.append("FSDP2: teacher weights are not sharded")
    elif not (zero3 or fsdp2) and any(
        p.is_meta or p.numel() == 0 or hasattr(p, "ds_id") for p in params
    ):
        problems.append(
            "teacher weights are partitioned or on the meta device (ZeRO-3 / FSDP loading)"
        )
    with whole():
        after = checksum(teacher)
    if after != before:
        problems.append("teacher weights changed during training")
    sums = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(sums, after)
    else:
        sums = [after]
    if len(set(sums)) != 1:
        problems.append(f"teacher weights differ between processes: {sums}")
    wrapped = type(trainer.model_wrapped).__name__
    status = "ok" if not problems else "FAILED: " + "; ".join(problems)
    print(
        f"rank {rank}/{world}: student wrapped as {wrapped}, teacher {type(trainer.teacher).__name__} on "
        f"{next(teacher.parameters()).device} {next(teacher.parameters()).dtype}, checksum {after}: {status}",
        flush=True,
    )
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
