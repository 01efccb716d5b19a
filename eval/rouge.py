"""ROUGE-1/2/L/Lsum (rouge-score, stemming) of hypotheses against references, one JSON string per
line (a summary spans several sentences; newlines inside it mark sentences for ROUGE-Lsum).

    python eval/rouge.py hypotheses.jsonl references.jsonl
"""

import argparse
import json

from lmkd.scoring.metrics import rouge


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("hypotheses")
    p.add_argument("references")
    a = p.parse_args()
    print(json.dumps(rouge(read_jsonl(a.hypotheses), read_jsonl(a.references)), indent=1))
