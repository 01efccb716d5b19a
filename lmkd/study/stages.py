"""The study's stage cache: every stage lives in ``ROOT/stages/NAME``, keyed by a hash of its inputs.

A stage is written to a temporary directory and moved into place when it finishes, with a
``stage.json`` holding :func:`lmkd.io.stable_hash` of its options and of the keys of the stages it
reads.  A stage whose key matches is skipped, so an interrupted study resumes at its first
unfinished stage and a changed option recomputes only what depends on it.  ``ROOT/study.log``
(JSON lines) records every stage that ran, with its timing.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from ..io import atomic_dir, atomic_write_json, stable_hash


class StudyStopped(Exception):
    """Stops a study between two stages, as an interruption would: an ``after_stage`` callback
    raises it; the finished stages stay cached and the same command resumes after them."""


def format_duration(seconds: float) -> str:
    """``12.3s`` under a minute, else ``4m05s``."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


class Stages:
    """Runs named stages with caching in ``root/stages`` (see the module docstring).

    ``after_stage(name)``, when given, is called after each stage that ran (not one found cached)
    once its directory and log line are on disk; raising :class:`StudyStopped` (or anything) from it
    stops the study there, resumable.
    """

    def __init__(self, root: str, total: int, after_stage: Callable[[str], None] | None = None):
        self.root = Path(root)
        self.dir = self.root / "stages"
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(".tmp-*"):  # what a killed run was writing
            shutil.rmtree(stale, ignore_errors=True)
        self.keys: dict[str, str] = {}
        self.total = total
        self.count = 0
        self.start = time.time()
        self.after_stage = after_stage

    def path(self, name: str) -> str:
        return str(self.dir / name.replace("+", "_"))

    def run(self, name: str, options: dict, deps: list[str], fn: Callable[[str], object], what: str = "") -> str:
        """Run ``fn(tmpdir)`` unless ``stage.json`` in the stage dir holds the same key; return the dir."""
        self.count += 1
        key = stable_hash({"options": options, "deps": {d: self.keys[d] for d in deps}})
        final = Path(self.path(name))
        meta_path = final / "stage.json"
        label = f"[{self.count}/{self.total}] {name}"
        why = ""
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key:
                self.keys[name] = key
                print(f"{label}: cached ({format_duration(meta.get('elapsed_s', 0))} when it ran)", flush=True)
                return str(final)
            changed = sorted(k for k in set(options) | set(meta.get("options", {}))
                             if options.get(k) != meta.get("options", {}).get(k))
            changed += sorted(d for d in deps if meta.get("deps", {}).get(d) != self.keys[d])
            why = f" (recomputing: {', '.join(changed) or 'changed'} changed)"
        print(f"{label}: {what or 'running'}{why} ...", flush=True)
        t0 = time.time()
        with atomic_dir(str(final), overwrite=True) as tmp:  # a killed stage leaves only a .tmp-* dir
            fn(tmp)
            elapsed = time.time() - t0
            meta = {"stage": name, "key": key, "options": options, "deps": {d: self.keys[d] for d in deps},
                    "elapsed_s": round(elapsed, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
            atomic_write_json(os.path.join(tmp, "stage.json"), meta, default=str)
        self.keys[name] = key
        with open(self.root / "study.log", "a", encoding="utf-8") as f:
            f.write(json.dumps({"stage": name, "key": key, "elapsed_s": round(elapsed, 2),
                                "finished": meta["finished"]}) + "\n")
        print(f"{label}: done in {format_duration(elapsed)} (study at {format_duration(time.time() - self.start)})",
              flush=True)
        if self.after_stage is not None:
            self.after_stage(name)
        return str(final)
