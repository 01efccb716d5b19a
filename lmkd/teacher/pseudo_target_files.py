"""The output directory of ``lmkd generate``: the settings that decide the generated rows (recorded
in :data:`SETTINGS_FILE`, compared on resume), the chunks each process writes under
:data:`CHUNK_DIR`, their merge in input order (with Seq-Inter and the filters of
:mod:`lmkd.teacher.selection`) into ``datasets``' format or :data:`JSONL_FILE`, and reading the
result back (:func:`load_generated`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass

from lmkd.core.errors import LmkdError
from lmkd.core.io import write_jsonl
from lmkd.data import chat
from lmkd.teacher.selection import FILTER_METRICS, select_and_filter

logger = logging.getLogger(__name__)

SETTINGS_FILE = "lmkd_generate.json"
CHUNK_DIR = "chunks"
JSONL_FILE = "generated.jsonl"
FORMATS = ("arrow", "jsonl")


@dataclass
class GenerationSettings:
    """Everything that decides the generated rows (recorded next to the output; a resumed run must
    have the same).

    Attributes:
        teacher: the teacher's path or name.
        data_rows: the number of input rows.
        data_sha256: the SHA-256 of the prefixed inputs.
        source_column: the input column.
        source_prefix: text put before every input.
        max_source_length: inputs are cut to this many tokens.
        num_beams: beams (1 when sampling).
        num_return_sequences: hypotheses kept per row (<= ``num_beams`` for beam search).
        max_new_tokens: the most tokens generated per row.
        do_sample: sample instead of beam search.
        temperature: the sampling temperature.
        top_k: sample from the K likeliest tokens only (None: all).
        top_p: nucleus sampling's mass (None: off).
        seed: seeds the sampling.
        length_penalty: beam search's length penalty.
        no_repeat_ngram_size: forbid repeating n-grams of this size (0: off).
        repetition_penalty: the penalty on repeated tokens.
        dtype: the teacher's dtype.
        chunk_size: rows per chunk.
        sort_by_length: the longest rows are generated first.
        select: ``seq-inter``, or None.
        reference_column: the references for ``select`` and the filter.
        filter_metric: the sentence metric filtered on, or None.
        filter_min: the lowest score kept.
        output_format: ``arrow`` or ``jsonl``.
        chat_column: causal chat rows: the column of their messages (``messages``, or ``prompt``
            of prompt/completion messages); the output gets ``teacher_messages``: the
            conversation with the teacher's answer as its last assistant turn (None: text rows).
    """

    teacher: str
    data_rows: int
    data_sha256: str
    source_column: str = "source"
    source_prefix: str = ""
    max_source_length: int = 512
    num_beams: int = 5
    num_return_sequences: int = 1
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    repetition_penalty: float = 1.0
    dtype: str = "float32"
    chunk_size: int = 1024
    sort_by_length: bool = True
    select: str | None = None
    reference_column: str | None = None
    filter_metric: str | None = None
    filter_min: float | None = None
    output_format: str = "arrow"
    chat_column: str | None = None

    def check(self) -> None:
        if self.num_beams < 1 or self.num_return_sequences < 1 or self.max_new_tokens < 1:
            raise LmkdError(
                "--num-beams, --num-return-sequences and --max-new-tokens must be at least 1"
            )
        if self.do_sample and self.num_beams > 1:
            raise LmkdError(
                f"sampling (--do-sample) uses one beam, not --num-beams {self.num_beams}; drop "
                "--num-beams (or pass --num-beams 1), or drop --do-sample for beam search"
            )
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            raise LmkdError(
                f"--num-return-sequences {self.num_return_sequences} needs --num-beams >= "
                f"{self.num_return_sequences} (or --do-sample to draw K samples)"
            )
        if self.do_sample and not self.temperature > 0:
            raise LmkdError(f"--temperature must be > 0, got {self.temperature}")
        if self.chunk_size < 1:
            raise LmkdError(f"--chunk-size must be at least 1, got {self.chunk_size}")
        if self.output_format not in FORMATS:
            raise LmkdError(f"unknown output format {self.output_format!r}; choose arrow or jsonl")
        if self.select is not None and self.num_return_sequences < 2:
            raise LmkdError(
                "--select seq-inter chooses among the K-best: pass --num-return-sequences K > 1"
            )
        if self.filter_metric is not None and self.filter_metric not in FILTER_METRICS:
            raise LmkdError(
                f"unknown filter metric {self.filter_metric!r}; choose one of {', '.join(FILTER_METRICS)}"
            )
        if (self.select or self.filter_metric) and not self.reference_column:
            raise LmkdError(
                "--select/--filter-metric need the references: pass --reference-column (e.g. target)"
            )


def recorded_settings(settings: GenerationSettings) -> dict:
    """The settings as the output directory records them: without ``chat_column`` on text rows,
    so a directory written before it existed still resumes.

    Args:
        settings: the run's settings.

    Returns:
        The settings as a dict.
    """
    out = asdict(settings)
    if out.get("chat_column") is None:
        out.pop("chat_column", None)
    return out


def merge(
    rows: list[dict], chunks: list[list[int]], s: GenerationSettings, output_dir: str
) -> dict:
    """Read every chunk, put the rows back in input order, apply Seq-Inter/filtering, write.

    Args:
        rows: the input rows, in input order.
        chunks: the input indices of each chunk (chunk ``c`` is ``CHUNK_DIR/chunk-{c:06d}.jsonl``).
        s: the run's settings (selection, filter, output format).
        output_dir: the output directory.

    Returns:
        The selection/filter report (:func:`lmkd.teacher.selection.select_and_filter`'s).
    """
    import datasets

    chunk_dir = os.path.join(output_dir, CHUNK_DIR)
    gen: dict[int, dict] = {}
    for c, members in enumerate(chunks):
        path = os.path.join(chunk_dir, f"chunk-{c:06d}.jsonl")
        if not os.path.isfile(path):
            raise LmkdError(
                f"chunk {path} is missing (a process failed?); re-run the same command to finish it"
            )
        with open(path, encoding="utf-8") as f:
            for line in f:
                o = json.loads(line)
                gen[o.pop("_index")] = o
        if not set(members) <= set(gen):
            raise LmkdError(f"chunk {path} is incomplete; delete it and re-run the same command")
    out = []
    for i, r in enumerate(rows):
        o = gen[i]
        row = dict(r)
        row["teacher_target"] = o["teacher_nbest"][0]
        row["teacher_score"] = o["teacher_nbest_scores"][0]
        if s.num_return_sequences > 1:
            row["teacher_nbest"] = o["teacher_nbest"]
            row["teacher_nbest_scores"] = o["teacher_nbest_scores"]
        out.append(row)
    out, report = select_and_filter(
        out, s.select, s.reference_column, s.filter_metric, s.filter_min
    )
    if "seq_inter_changed" in report:
        logger.info(
            "seq-inter: %d of %d rows use a hypothesis other than the teacher's best",
            report["seq_inter_changed"],
            report["rows_in"],
        )
    if "filter_dropped" in report:
        logger.info(
            "filter %s >= %s: dropped %d of %d rows",
            s.filter_metric,
            s.filter_min,
            report["filter_dropped"],
            report["rows_in"],
        )
    if not out:
        raise LmkdError("the filter dropped every row; lower --filter-min")
    if s.chat_column:  # what the student trains on: source_column teacher_messages
        for row in out:
            row["teacher_messages"] = chat.with_response(row[s.chat_column], row["teacher_target"])
    if s.output_format == "jsonl":
        write_jsonl(os.path.join(output_dir, JSONL_FILE), out)
    else:
        tmp = os.path.join(output_dir, ".tmp-dataset")
        shutil.rmtree(tmp, ignore_errors=True)
        datasets.Dataset.from_list(out).save_to_disk(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: n == "state.json")  # state.json last
        for name in names:
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
        os.rmdir(tmp)
    return {k: v for k, v in report.items()}


def load_generated(output_dir: str):
    """The generated dataset in ``output_dir`` (either format) as a ``datasets.Dataset``.

    Args:
        output_dir: the directory ``lmkd generate`` wrote.

    Returns:
        Its rows (:data:`JSONL_FILE` when there, else the saved arrow dataset).
    """
    import datasets

    path = os.path.join(output_dir, JSONL_FILE)
    if os.path.isfile(path):
        from lmkd.data.reading import load_data

        return load_data(path)
    return datasets.load_from_disk(output_dir)
