#!/usr/bin/env bash
# GPU check of the recipes' launch paths and of `lmkd evaluate` on CUDA (run by hand on a GPU machine;
# not part of the test suite).  Needs lmkd's dependencies; on a bare image carry them as wheels in .whl/.
#   bash benchmarks/device_check_recipes.sh OUTDIR
set -u
OUT=${1:-${OUT:-/tmp/lmkd-device-check}}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 LMKD_QUIET=1
W=/tmp/lmkd-work; rm -rf $W; mkdir -p $W
python3 - <<'PY' || exit 1
import gzip, json, torch, transformers, datasets, accelerate
print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__,
      "datasets", datasets.__version__, torch.cuda.get_device_name())
from lmkd.scratch import build_model, train_tokenizer
from lmkd.student import make_student
rows = [json.loads(l) for l in gzip.open("lmkd/corpora/ddtp_en_fr.train.jsonl.gz", "rt")][:2000]
tok = train_tokenizer([r["source"] for r in rows] + [r["target"] for r in rows], vocab_size=2000)
teacher = build_model("marian", len(tok), d_model=256, layers=6, heads=4, max_positions=512)
student = make_student(teacher, encoder_layers=list(range(6)), decoder_layers=[0, 3, 5])
for name, m in (("teacher", teacher), ("student", student)):
    m.save_pretrained(f"/tmp/lmkd-work/{name}"); tok.save_pretrained(f"/tmp/lmkd-work/{name}")
with open("/tmp/lmkd-work/train.jsonl", "w") as f:
    for r in rows: f.write(json.dumps(r) + "\n")
PY
COMMON="--student_model_name_or_path $W/student --teacher_model_name_or_path $W/teacher --train_file $W/train.jsonl --validation_file $W/train.jsonl --max_eval_samples 64 --max_steps 30 --per_device_train_batch_size 32 --logging_steps 10 --save_strategy no --eval_strategy no --report_to none --disable_tqdm true"
echo "== single GPU, bf16 recipe"
timeout 240 python3 -m accelerate.commands.launch --config_file recipes/accelerate/single_gpu.yaml -m lmkd distill recipes/translation/marian_word_kd.yaml $COMMON --output_dir $W/out_single > $OUT/single_gpu.log 2>&1; echo "rc=$?"; tail -n 25 $OUT/single_gpu.log
echo "== FSDP config, one process"
timeout 240 python3 -m accelerate.commands.launch --config_file recipes/accelerate/fsdp.yaml --num_processes 1 -m lmkd distill recipes/translation/marian_word_kd.yaml $COMMON --output_dir $W/out_fsdp > $OUT/fsdp.log 2>&1; echo "rc=$?"; tail -n 25 $OUT/fsdp.log
echo "== check_teacher under FSDP (1 process) and single GPU"
timeout 180 python3 -m accelerate.commands.launch --config_file recipes/accelerate/fsdp.yaml --num_processes 1 recipes/accelerate/check_teacher.py --teacher $W/teacher --student $W/student --data $W/train.jsonl --bf16 --output $W/ct_fsdp 2>&1 | grep -E "rank|Error|error" | tail -5
timeout 180 python3 -m accelerate.commands.launch --config_file recipes/accelerate/single_gpu.yaml recipes/accelerate/check_teacher.py --teacher $W/teacher --student $W/student --data $W/train.jsonl --bf16 --output $W/ct_single 2>&1 | grep -E "rank|Error|error" | tail -5
echo "== reload with plain transformers"
python3 -c "
from transformers import AutoModelForSeq2SeqLM as A
for d in ('$W/out_single', '$W/out_fsdp'):
    m = A.from_pretrained(d); print(d, m.config.decoder_layers, sum(p.numel() for p in m.parameters()))
"
echo "== lmkd evaluate on cuda"
head -n 200 $W/train.jsonl > $W/test.jsonl
timeout 240 python3 -m lmkd evaluate --model $W/out_single --teacher $W/teacher --data $W/test.jsonl --task translation --num-beams 4 --max-new-tokens 32 --batch-size 32 --speed-samples 128 --repeats 3 --device cuda --output $OUT/eval.json --plot $OUT/eval.png 2>&1 | grep -v "it/s\]" | tail -n 14
echo "== bench_evaluate on cuda"
timeout 240 python3 benchmarks/bench_evaluate.py --device cuda --d-model 512 --layers 6 --student-decoder-layers 2 --samples 256 --batch-size 64 --max-new-tokens 48 --repeats 3 --json $OUT/bench_evaluate.json 2>&1 | grep -v "it/s\]" | tail -n 14
