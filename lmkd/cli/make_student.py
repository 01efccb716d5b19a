"""``lmkd make-student``: a smaller student by copying chosen teacher layers."""

from __future__ import annotations

import argparse
import json

from lmkd.core.io import atomic_dir, check_fresh_dir, check_output


def layer_list(text: str) -> list[int]:
    """Parse a layer list: '0,2,4' or '0-5,11' (inclusive ranges) -> [0, 2, 4] /
    [0, 1, 2, 3, 4, 5, 11].

    Args:
        text: layer indices and ranges, separated by commas or spaces.

    Returns:
        The layer indices in the order given.

    Raises:
        argparse.ArgumentTypeError: a part that is not an integer or range.
    """
    out: list[int] = []
    try:
        for part in text.replace(",", " ").split():
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"layer list must be integers like '0,2,4' or '0-5', got {text!r}"
        ) from e
    return out


def add_parser(sub):
    """Add the ``make-student`` subcommand's parser.

    Args:
        sub: the ``lmkd`` parser's subparsers.

    Returns:
        None.
    """
    p = sub.add_parser(
        "make-student",
        help="build a smaller student by copying teacher layers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Copy chosen teacher layers into a smaller student (DistilBERT / shrink-and-fine-tune).",
        epilog="examples:\n  lmkd make-student --teacher bert-base-uncased --output students/bert6\n"
        "  lmkd make-student --teacher facebook/bart-large-cnn --output students/bart-12-3 "
        "--encoder-layers 0-11 --decoder-layers 0,6,11\n"
        "Unspecified stacks keep every other layer (0,2,4,...).",
    )
    p.add_argument("--teacher", required=True, help="teacher checkpoint (hub id or local dir)")
    p.add_argument(
        "--output", required=True, help="directory to write the student (and tokenizer) to"
    )
    p.add_argument(
        "--layers",
        type=layer_list,
        help="teacher layers to keep, single-stack models (BERT, GPT-2)",
    )
    p.add_argument(
        "--encoder-layers", type=layer_list, help="encoder layers to keep (T5, BART, Marian)"
    )
    p.add_argument(
        "--decoder-layers", type=layer_list, help="decoder layers to keep (T5, BART, Marian)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=run)


def run(ns) -> None:
    """Run ``lmkd make-student``.

    Args:
        ns: its parsed arguments.

    Returns:
        None.
    """
    from lmkd.models.loading import kind_from_config, load_model, load_tokenizer
    from lmkd.models.size import count_parameters
    from lmkd.models.student import make_student

    check_output(ns.output, "--output", directory=True)  # before the teacher loads, not when saving
    check_fresh_dir(ns.output, ns.overwrite)
    teacher = load_model(ns.teacher, kind=kind_from_config(ns.teacher))
    tokenizer = load_tokenizer(ns.teacher, required=False)
    student = make_student(
        teacher,
        layers=ns.layers,
        encoder_layers=ns.encoder_layers,
        decoder_layers=ns.decoder_layers,
    )
    with atomic_dir(ns.output, ns.overwrite) as tmp:
        student.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    nt, ns_ = count_parameters(teacher), count_parameters(student)
    print(
        f"student: {ns_:,} parameters ({ns_ / nt:.0%} of the teacher's {nt:,}); layers "
        f"{json.dumps(student.config.lmkd_layer_map)} -> {ns.output}"
    )
