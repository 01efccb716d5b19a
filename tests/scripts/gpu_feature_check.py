"""Manual GPU check of feature distillation (not collected by pytest; needs CUDA):

    python3 tests/scripts/gpu_feature_check.py

A BERT teacher and a narrower student (so a hint projection is trained) run DistillationTrainer.train
with bf16 on the GPU with hidden, attention and relation losses: the projections live on the GPU and
change, each loss component is logged and finite, the teacher is unchanged, and the saved student
reloads as a plain model without projection weights."""

from __future__ import annotations

import importlib.machinery
import sys
import tempfile
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
try:  # the GPU image has no `datasets`; this check reads no data files
    import datasets  # noqa: F401
except ImportError:
    stub = types.ModuleType("datasets")
    stub.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    stub.Dataset = stub.IterableDataset = stub.DatasetDict = type("NoDataset", (), {})
    sys.modules["datasets"] = stub

from transformers import AutoModelForMaskedLM  # noqa: E402

from lmkd import DistillationConfig, DistillationTrainer
from lmkd.models.scratch import build_model

assert torch.cuda.is_available(), "needs a GPU"
vocab = 2000
teacher = build_model("bert", vocab, seed=1, d_model=256, layers=4, heads=4)
student = build_model("bert", vocab, seed=2, d_model=128, layers=2, heads=2)
g = torch.Generator().manual_seed(0)
rows = []
for i in range(64):
    n = 16 + i % 48
    ids = torch.randint(5, vocab, (n,), generator=g)
    labels = torch.full((n,), -100)
    pick = torch.rand(n, generator=g) < 0.15
    labels[pick] = ids[pick]
    ids[pick] = 4
    rows.append({"input_ids": ids, "labels": labels})


def collate(batch):
    n = max(len(r["input_ids"]) for r in batch)
    out = {
        "input_ids": torch.zeros(len(batch), n, dtype=torch.long),
        "attention_mask": torch.zeros(len(batch), n, dtype=torch.long),
        "labels": torch.full((len(batch), n), -100),
    }
    for i, r in enumerate(batch):
        k = len(r["input_ids"])
        out["input_ids"][i, :k], out["attention_mask"][i, :k], out["labels"][i, :k] = (
            r["input_ids"],
            1,
            r["labels"],
        )
    return out


out = tempfile.mkdtemp()
args = DistillationConfig(
    output_dir=out,
    per_device_train_batch_size=16,
    gradient_accumulation_steps=2,
    max_steps=6,
    learning_rate=1e-3,
    bf16=True,
    teacher_dtype="bfloat16",
    kd_alpha=0.5,
    hidden_weight=1.0,
    attention_weight=1.0,
    relation_weight=1.0,
    logging_steps=2,
    report_to="none",
    save_strategy="steps",
    save_steps=6,
    disable_tqdm=True,
    remove_unused_columns=False,
)
trainer = DistillationTrainer(
    model=student, args=args, teacher_model=teacher, train_dataset=rows, data_collator=collate
)
proj = trainer.projections["layers"]
assert proj.weight.device.type == "cuda", proj.weight.device
w0 = proj.weight.detach().clone()
t0 = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
trainer.train()
logs = [h for h in trainer.state.log_history if "loss_hidden" in h]
print(logs)
assert logs and all(
    all(
        torch.isfinite(torch.tensor(h[k]))
        for k in ("loss", "loss_kd", "loss_hidden", "loss_attention", "loss_relation")
    )
    for h in logs
)
assert not torch.equal(w0, proj.weight), "projection unchanged"
assert all(torch.equal(v, trainer.teacher.state_dict()[k]) for k, v in t0.items()), (
    "teacher changed"
)
assert (Path(out) / "checkpoint-6" / "lmkd_projections.pt").is_file()
trainer.save_model(out + "/final")
re = AutoModelForMaskedLM.from_pretrained(out + "/final")
assert set(re.state_dict()) == set(student.state_dict())
print("gpu feature check ok: projection on", proj.weight.device, "| last log", logs[-1])
