"""``lmkd serve-teacher``: serve a teacher's top-k log-probs over HTTP for ``lmkd distill``."""

from __future__ import annotations

import argparse
import sys

from lmkd.cli.flags import count
from lmkd.core.constants import AUTO_DTYPE_NAMES


def add_parser(sub):
    """Add the ``serve-teacher`` subcommand's parser.

    Args:
        sub: the ``lmkd`` parser's subparsers.

    Returns:
        None.
    """
    p = sub.add_parser(
        "serve-teacher",
        help="serve a teacher's top-k log-probs over HTTP (for distill --teacher-server-url)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Load a Hugging Face causal or seq2seq LM and answer, over HTTP, its top-k "
        "log-probs and the log of the remaining mass at every position of the rows asked (token "
        "ids, or text for a student of another tokenizer): GET /info (vocabulary size, tokenizer "
        "fingerprint), POST /topk. Concurrent requests share batched forward passes. Runs until "
        "Ctrl-C. docs/served-teacher.md has the protocol and the vLLM/SGLang alternatives.",
        epilog="examples:\n"
        "  lmkd serve-teacher runs/teacher --port 8000\n"
        "  lmkd serve-teacher runs/teacher --host 0.0.0.0 --port 8000 --device cuda --dtype bfloat16\n"
        "  lmkd distill config.yaml --teacher-server-url http://gpu-box:8000 --teacher-top-k 32",
    )
    p.add_argument("model", help="teacher checkpoint (hub id or local dir with its tokenizer)")
    p.add_argument("--port", type=count(0), default=8000, help="port (default 8000; 0: any free)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1; 0.0.0.0 for other machines)",
    )
    p.add_argument(
        "--device", help="torch device for the teacher (default: cuda if available, else cpu)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=AUTO_DTYPE_NAMES,
        help="dtype the teacher runs in (default: as saved)",
    )
    p.add_argument(
        "--max-batch-rows",
        type=count(1),
        default=64,
        help="rows of queued requests run in one forward pass (default 64)",
    )
    p.set_defaults(func=run)


def run(ns) -> None:
    """Run ``lmkd serve-teacher`` until Ctrl-C.

    Args:
        ns: its parsed arguments.

    Returns:
        None.
    """
    from lmkd.models.loading import resolve_device
    from lmkd.teacher.served_server import make_server

    device = resolve_device(ns.device)
    server = make_server(
        ns.model,
        host=ns.host,
        port=ns.port,
        device=str(device),
        max_batch_rows=ns.max_batch_rows,
        dtype=ns.dtype,
    )
    info = server.scorer.info()
    host, port = server.server_address[:2]
    print(
        f"serving {ns.model} ({info['kind']}, {info['vocab_size']} ids, tokenizer "
        f"{info['tokenizer']}) on {device} at http://{host}:{port} -- Ctrl-C stops",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever()
    finally:
        server.server_close()
