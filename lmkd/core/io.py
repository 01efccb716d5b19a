"""Files: reading data rows, and writing so that a killed command never leaves a half-written file.

The bottom layer (with :mod:`lmkd.core.errors` and :mod:`lmkd.core.constants`).  Every module that reads
JSON lines or writes a result uses these instead of its own copy:

* :func:`read_rows` -- ``.jsonl`` / ``.json`` / ``.csv`` (optionally ``.gz``) with one-line errors
  (:func:`unreadable`: a truncated or corrupt file, in words);
* :func:`atomic_write_text` / :func:`atomic_write_json` / :func:`write_jsonl` -- write a temporary
  file beside the target, fsync, then ``os.replace`` (atomic on POSIX);
* :func:`atomic_dir` -- a temporary directory renamed to the target on success, removed on failure;
* :func:`check_output` -- before any work, a one-line error when an output could not be written;
* :func:`nothing_left_on_error` -- the directories a refused command made, removed again;
* :func:`file_digest` / :func:`stable_hash` -- content hashes that key cached work.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable

from lmkd.core.errors import LmkdError


def _open_text(path: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def unreadable(path: str, error: BaseException) -> str | None:
    """What is wrong with a data file whose reading raised ``error``, in words, or None when the error
    is not about the file's bytes (a truncated or corrupt gzip stream, text that is not UTF-8).

    Args:
        path: the file read.
        error: what reading it raised (gzip / zlib / codec errors).

    Returns:
        A one-line message naming ``path``, or None.
    """
    if isinstance(error, EOFError):
        return (
            f"data file {path} is truncated: its gzip stream ends before its end marker (a download or "
            "copy cut short?); write or fetch it again"
        )
    if isinstance(error, gzip.BadGzipFile):
        return (
            f"data file {path} is not gzip data although its name ends in .gz ({error}); rename or "
            "recompress it"
        )
    if isinstance(error, zlib.error):
        return (
            f"data file {path} is corrupt: its gzip data cannot be decompressed ({error}); write or "
            "fetch it again"
        )
    if isinstance(error, UnicodeDecodeError):
        byte = error.object[error.start : error.start + 1]
        return (
            f"data file {path} is not UTF-8 text (byte {byte!r} at offset {error.start} of a block); "
            "save it as UTF-8"
        )
    return None


def read_rows(path: str) -> list[dict]:
    """Rows of a .jsonl/.json/.csv file (optionally gzipped), with one-line errors: a missing, empty,
    truncated or corrupt file, or a line that is not a JSON object, is an :class:`LmkdError` naming it.

    Args:
        path: the data file.

    Returns:
        Its rows, each a dict.
    """
    if not os.path.exists(path):
        raise LmkdError(f"data file {path} does not exist; check the path")
    try:
        return _read_rows(path)
    except (EOFError, OSError, zlib.error, UnicodeDecodeError) as e:
        message = unreadable(path, e)
        if message is None:
            if not isinstance(e, OSError):
                raise
            message = f"data file {path} cannot be read: {e.strerror or e}"
        raise LmkdError(message) from e


def _read_rows(path: str) -> list[dict]:
    name = path[:-3] if path.endswith(".gz") else path
    rows: list[dict] = []
    with _open_text(path) as f:
        if name.endswith(".csv"):
            rows = list(csv.DictReader(f))
        elif name.endswith(".json") and not name.endswith(".jsonl"):
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise LmkdError(
                    f"{path} is not valid JSON ({e.msg} at line {e.lineno}); "
                    "use a JSON list of objects or JSON lines"
                ) from e
        else:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LmkdError(
                        f"{path} line {lineno} is not JSON ({e.msg}); each line must be one JSON "
                        'object like {"source": ..., "target": ...}'
                    ) from e
                if not isinstance(row, dict):
                    raise LmkdError(
                        f"{path} line {lineno} is not a JSON object; each line must be one object"
                    )
                rows.append(row)
    if not rows:
        raise LmkdError(f"data file {path} is empty; it needs at least one row")
    return rows


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it (fsync'd, then renamed).

    Args:
        path: the file to write (replaced if it exists).
        text: its whole content, written as UTF-8.
    """
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, obj, **kwargs) -> None:
    """``json.dump`` of ``obj`` to ``path``, atomically (keyword arguments go to ``json.dumps``).

    Args:
        path: the file to write.
        obj: a JSON-able object.
        **kwargs: passed to ``json.dumps`` (``indent`` defaults to 1).
    """
    kwargs.setdefault("indent", 1)
    atomic_write_text(path, json.dumps(obj, **kwargs) + "\n")


def write_jsonl(path: str, rows: Iterable[dict]) -> None:
    """One JSON object per line (UTF-8, not ASCII-escaped), atomically.

    Args:
        path: the ``.jsonl`` file to write.
        rows: the objects, one per line.
    """
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def replace_dir(tmp: str, final: str) -> None:
    """Move the finished directory ``tmp`` to ``final``, replacing what was there.

    Args:
        tmp: the finished directory (on the same file system as ``final``).
        final: where it goes; an existing directory there is removed first.
    """
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)


def check_fresh_dir(final: str, overwrite: bool = False) -> None:
    """Refuse a non-empty directory ``final`` unless ``overwrite`` (what :func:`atomic_dir` would
    replace), so a command can say so before its work instead of after it.

    Args:
        final: the output directory.
        overwrite: allow a non-empty ``final`` (``--overwrite``).

    Raises:
        LmkdError: ``final`` exists, is not empty, and ``overwrite`` is False.
    """
    if os.path.isdir(final) and os.listdir(final) and not overwrite:
        raise LmkdError(
            f"output directory {final} already exists and is not empty; choose another "
            "--output or pass --overwrite"
        )


@contextlib.contextmanager
def atomic_dir(final: str, overwrite: bool = False):
    """Yield a temporary directory next to ``final``; it becomes ``final`` when the block succeeds
    and is removed when it fails, so a failed command leaves no partial output behind.

    A non-empty ``final`` is refused unless ``overwrite``.

    Args:
        final: the output directory (its parent is made if missing).
        overwrite: replace a non-empty ``final``.

    Returns:
        A context manager yielding the temporary directory's path.

    Raises:
        LmkdError: ``final`` is not empty and ``overwrite`` is False.
    """
    check_fresh_dir(final, overwrite)
    parent = os.path.dirname(os.path.abspath(final))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(final) + "-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def check_output(path: str, flag: str, directory: bool = False) -> None:
    """A one-line error, before any work, when the output ``path`` could not be written at the end.

    ``path`` (given as ``flag``) is a file, or with ``directory`` a directory, made if missing; it
    could not be written when a directory (a file) is in its place, a parent of it is a file, or the
    nearest existing directory cannot be written in.  That last is tried with a temporary file,
    removed at once: permission bits do not tell a read-only mount, or what root may write.

    Args:
        path: the output file or directory.
        flag: the command-line option that gave it, named in the error.
        directory: ``path`` is a directory (made if missing), not a file.

    Raises:
        LmkdError: ``path`` could not be written, in words.
    """
    path = os.path.abspath(path)
    if directory and os.path.exists(path) and not os.path.isdir(path):
        raise LmkdError(
            f"{flag} {path} is a file, not a directory; choose a directory (it is made if missing)"
        )
    if not directory and os.path.isdir(path):
        raise LmkdError(
            f"{flag} {path} is a directory; give a file name, e.g. {os.path.join(path, 'eval.json')}"
        )
    parent = path if directory and os.path.isdir(path) else os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise LmkdError(f"{flag} {path} cannot be written: {parent} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise LmkdError(
            f"{flag} {path} cannot be written: {parent} does not let files be made in it "
            f"({e.strerror or e}); choose another place"
        ) from e


@contextlib.contextmanager
def nothing_left_on_error(path):
    """Around building a trainer (``Trainer.__init__`` creates ``output_dir``): when an
    :class:`LmkdError` comes out, remove the directories made meanwhile if they are still empty,
    so a refused run leaves nothing behind.

    Args:
        path: the output directory the block may create (None or empty: nothing to clean up).

    Returns:
        A context manager; it re-raises the :class:`LmkdError` after the cleanup.
    """
    made, p = [], os.path.abspath(str(path)) if path else None
    while p and not os.path.exists(p):  # path and its parents that do not exist yet, deepest first
        made.append(p)
        parent = os.path.dirname(p)
        p = parent if parent != p else None
    try:
        yield
    except LmkdError:
        for d in made:
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
        raise


def stable_hash(obj) -> str:
    """A short content hash of a JSON-able object (keys sorted), stable across runs.

    Args:
        obj: a JSON-able object (other values hash by their ``str``).

    Returns:
        The first 16 hex digits of its SHA-256.
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: str) -> str:
    """Content hash of a data file (or of every file under a directory, names included).

    Args:
        path: a file or a directory.

    Returns:
        The first 16 hex digits of the SHA-256 of the names (relative to ``path``) and bytes.
    """
    h = hashlib.sha256()
    paths = (
        [path]
        if os.path.isfile(path)
        else sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
    )
    for p in paths:
        h.update(os.path.relpath(p, path).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
