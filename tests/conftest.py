"""Shared fixtures: a tokenizer trained on the shipped corpus and tiny models built from configs,
saved with save_pretrained and loaded back with from_pretrained (the real loading path), offline."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Property tests draw the same examples on every run and machine (no example database): a result
# of `make test` depends on the code, not on which random cases a run happened to try.
from hypothesis import settings as _hypothesis_settings  # noqa: E402

_hypothesis_settings.register_profile("lmkd", derandomize=True, database=None)
_hypothesis_settings.load_profile("lmkd")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run faster on one thread than split across cores (and CI has two)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


CORPUS = Path(__file__).resolve().parents[1] / "lmkd" / "corpora"


def corpus_rows(split: str = "train", n: int | None = None) -> list[dict]:
    rows = []
    with gzip.open(CORPUS / f"ddtp_en_fr.{split}.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            rows.append(json.loads(line))
            if n is not None and len(rows) >= n:
                break
    return rows


@pytest.fixture(scope="session")
def corpus():
    return corpus_rows("train", 600)


@pytest.fixture(scope="session")
def tokenizer(corpus):
    from lmkd.models.scratch import train_tokenizer

    return train_tokenizer(
        [r["source"] for r in corpus] + [r["target"] for r in corpus], vocab_size=300
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """Factory: path of a saved tiny model of ``arch`` (and ``kind``), built once per session."""
    from lmkd.models.scratch import build_model

    cache: dict = {}

    def make(arch: str, kind: str | None = None, seed: int = 0, **sizes) -> str:
        key = (arch, kind, seed, tuple(sorted(sizes.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"{arch}-{kind or 'lm'}-{seed}")
            sizes.setdefault("layers", 4)
            model = build_model(arch, len(tokenizer), kind=kind, seed=seed, **sizes)
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)
            cache[key] = str(path)
        return cache[key]

    return make


@pytest.fixture()
def translation_file(tmp_path, corpus):
    path = tmp_path / "train.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in corpus[:64]:
            f.write(json.dumps(r) + "\n")
    return str(path)
