"""The study's Word-KD students from the cached teacher against the same students trained online.

Run a study twice on the same corpus -- once as it is (the Word-KD variants read the teacher's cached
top-32 + 32 sampled log-probs) and once with ``--online-kd`` (a teacher forward at every step),
the second in a copy of the first's directory so that the teacher, the transfer set and the other
students are the same stages -- then::

    python benchmarks/study_cached_vs_online.py runs/fren runs/fren-online

prints, for each Word-KD variant: the steps, the training time (each stage's own wall time, two
jobs side by side in both runs) and the test BLEU of both, and the paired bootstrap of the cached
student against the online one on the test rows (lmkd.scoring.significance, the study report's test).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmkd.scoring.significance import paired_bootstrap

VARIANTS = ("s025-word-kd", "s025-seq-kd+word-kd")


def _stage(study: Path, name: str) -> Path:
    return study / "stages" / name.replace("+", "_")


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("cached", help="study directory trained with the teacher cache (the default)")
    p.add_argument(
        "online", help="the same study run again with --online-kd (a copy of the first's directory)"
    )
    p.add_argument(
        "--mode",
        default="beam",
        choices=("beam", "greedy"),
        help="which decoding to compare (default beam)",
    )
    ns = p.parse_args(argv)
    cached, online = Path(ns.cached), Path(ns.online)
    plans = [_read(d / "report.json")["plan"] for d in (cached, online)]
    if not plans[0].get("kd_cache") or plans[1].get("kd_cache"):
        raise SystemExit("the first study must use the teacher cache and the second --online-kd")
    refs = [
        json.loads(line)["target"]
        for line in (_stage(cached, "data-test") / "test.jsonl").read_text().splitlines()
        if line.strip()
    ]
    print(
        f"# {cached} (cached: top-{plans[0]['kd_cache']['top_k']} + {plans[0]['kd_cache']['tail_samples']} "
        f"sampled) vs {online} (--online-kd); BLEU {ns.mode} on {len(refs)} test rows"
    )
    print(
        "| variant | steps cached | steps online | train s cached | train s online | BLEU cached | BLEU online "
        "| cached - online (95% CI) | p |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in VARIANTS:
        row = []
        quality = []
        for d in (cached, online):
            log = _read(_stage(d, name) / "train_log.json")
            elapsed = _read(_stage(d, name) / "stage.json")["elapsed_s"]
            q = _read(_stage(d, f"eval-{name}") / "quality.json")
            row.append((log["steps"], elapsed, q[ns.mode]["bleu"]))
            quality.append(q["predictions"][ns.mode])
        c = paired_bootstrap("bleu", quality[0], quality[1], refs)
        (sc, tc, bc), (so, to, bo) = row
        print(
            f"| {name} | {sc} | {so} | {tc:.0f} | {to:.0f} | {bc:.2f} | {bo:.2f} | {c.difference:+.2f} "
            f"({c.ci_low:+.2f}…{c.ci_high:+.2f}) | {c.p_value:.3f} |"
        )


if __name__ == "__main__":
    main()
