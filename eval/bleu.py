"""BLEU and chrF (sacrebleu, with signatures) of a hypothesis file against a reference file, one
segment per line -- for outputs that already exist (e.g. the predictions in `lmkd evaluate`'s JSON).

    python eval/bleu.py hypotheses.txt references.txt
"""

import argparse
import json

from lmkd.scoring.metrics import bleu, chrf


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f]


if __name__ == "__main__":
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("hypotheses")
    p.add_argument("references")
    a = p.parse_args()
    hyps, refs = read_lines(a.hypotheses), read_lines(a.references)
    (b, b_sig), (c, c_sig) = bleu(hyps, refs), chrf(hyps, refs)
    print(
        json.dumps(
            {"bleu": b, "chrf": c, "bleu_signature": b_sig, "chrf_signature": c_sig}, indent=1
        )
    )
