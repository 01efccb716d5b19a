"""Latency (batch 1) and throughput of a student and its teacher, measured in one interleaved run
on the same inputs -- no quality scoring.

    python eval/speed.py --model runs/student --teacher runs/teacher --data test.jsonl --task translation
"""

import argparse
import json

from lmkd.data.dataset import DEFAULT_COLUMNS
from lmkd.data.reading import load_data
from lmkd.evaluate.runners import runner_for
from lmkd.models.loading import load_model, load_tokenizer, resolve_device
from lmkd.scoring.timing import measure_speed

if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True)
    p.add_argument("--teacher")
    p.add_argument("--data", required=True)
    p.add_argument(
        "--task", required=True, choices=["translation", "summarization", "classification"]
    )
    p.add_argument("--source-column")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-beams", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    column = a.source_column or DEFAULT_COLUMNS[a.task][0]
    inputs = [str(x) for x in load_data(a.data, [column])[column][: a.samples]]
    device = resolve_device(a.device)
    kind = "classification" if a.task == "classification" else "seq2seq"
    runners = {}
    for name, path in (("student", a.model), ("teacher", a.teacher)):
        if path:
            model, tok = load_model(path, kind=kind).to(device).eval(), load_tokenizer(path)
            runners[name] = runner_for(
                a.task, model, tok, num_beams=a.num_beams, max_new_tokens=a.max_new_tokens
            )
    speed = measure_speed(
        runners, inputs, a.batch_size, repeats=a.repeats, devices={k: device for k in runners}
    )
    if "teacher" in speed:
        speed["speedup_latency"] = speed["teacher"]["latency_ms"] / speed["student"]["latency_ms"]
        speed["speedup_throughput"] = (
            speed["student"]["throughput_per_s"] / speed["teacher"]["throughput_per_s"]
        )
    print(json.dumps(speed, indent=1))
