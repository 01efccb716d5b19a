"""The study's stage cache: every stage lives in ``ROOT/stages/NAME``, keyed by a hash of its inputs.

A stage is written to a temporary directory and moved into place when it finishes, with a
``stage.json`` holding :func:`lmkd.core.io.stable_hash` of its options and of the keys of the stages it
reads.  A stage whose key matches is skipped, so an interrupted study resumes at its first
unfinished stage and a changed option recomputes only what depends on it.  ``ROOT/study.log``
(JSON lines) records every stage that ran, with its timing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from lmkd.core.errors import LmkdError
from lmkd.core.io import atomic_dir, atomic_write_json, stable_hash


class StudyStopped(Exception):
    """Stops a study between two stages, as an interruption would: an ``after_stage`` callback
    raises it; the finished stages stay cached and the same command resumes after them.

    Args:
        *args: an optional message, as for any exception.
    """


def format_duration(seconds: float) -> str:
    """``12.3s`` under a minute, else ``4m05s``.

    Args:
        seconds: the duration.

    Returns:
        The text.
    """
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def job_ref(fn: Callable[..., object]) -> str:
    """How a job names its function for a worker process: ``module:qualname``, derived from the function.

    Args:
        fn: a function a worker process can import (module level, or a class's method).

    Returns:
        ``"lmkd.study.models:train_student"``, say.
    """
    return f"{fn.__module__}:{fn.__qualname__}"


def resolve_job(call: str) -> Callable[..., object]:
    """The function a job's ``call`` names: ``module:qualname`` (:func:`job_ref`); a module without a dot
    that is one of ``lmkd.study`` may be named alone (``"models:train_student"``, as older callers do).

    Args:
        call: the reference.

    Returns:
        The function.

    Raises:
        ValueError: ``call`` does not name an object that can be imported.
        TypeError: it names one that is not callable.
    """
    import importlib
    import importlib.util

    module, _, qualname = call.partition(":")
    if not module or not qualname or "<locals>" in qualname:
        raise ValueError(
            f"a study job names an importable function as 'module:qualname', got {call!r}"
        )
    if "." not in module and importlib.util.find_spec(f"lmkd.study.{module}") is not None:
        module = f"lmkd.study.{module}"
    try:
        obj: object = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"the study job function {call!r} cannot be imported: {e}") from e
    if not callable(obj):
        raise TypeError(f"the study job function {call!r} is not a function")
    return obj


@dataclass
class Job:
    """A stage that may run in a worker process of its own (:meth:`Stages.run_jobs`).

    Args:
        name: the stage name.
        options: the stage's own options (hashed, with the keys of ``deps``).
        deps: the stages it reads (other jobs of the same batch wait for them).
        call: the function doing the work, called as ``call(out, **kwargs)`` with the stage's temporary
            directory, in this process or in ``python -m lmkd.study.worker``; given as the function
            (or as its ``module:qualname``), kept as its :func:`job_ref`, checked here to resolve back to
            it -- a renamed or nested function fails when the job is made, not in a worker.
        kwargs: its JSON-able keyword arguments (a :class:`~lmkd.study.plan.Plan` goes as its ``to_dict()``).
        what: what the progress line says it does.
        cost: the scheduler starts the costliest ready jobs first (e.g. 2 for a student that also runs
            its teacher).
    """

    name: str
    options: dict
    deps: list[str]
    call: Callable[..., object] | str
    kwargs: dict
    what: str = ""
    cost: float = 1.0
    dir: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        ref = self.call if isinstance(self.call, str) else job_ref(self.call)
        fn = resolve_job(ref)
        if not isinstance(self.call, str) and fn is not self.call:
            raise ValueError(
                f"the study job {self.name}'s function {ref} resolves to another object"
            )
        self.call = ref


def call_job(call: str, kwargs: dict, out: str) -> None:
    """Run a :class:`Job`'s function: ``function(out, **kwargs)``.

    Args:
        call: the function's reference (:func:`job_ref`).
        kwargs: its keyword arguments.
        out: the stage's (temporary) directory.
    """
    resolve_job(call)(out, **kwargs)


def _jsonable(obj: object) -> object:
    """JSON for what a job's kwargs hold besides JSON types: a dataclass (the plan) as its dict."""
    to_dict = getattr(obj, "to_dict", None)
    return to_dict() if callable(to_dict) else str(obj)


class Stages:
    """Runs named stages with caching in ``root/stages`` (see the module docstring).

    ``after_stage(name)``, when given, is called after each stage that ran (not one found cached)
    once its directory and log line are on disk; raising :class:`StudyStopped` (or anything) from it
    stops the study there, resumable.

    Args:
        root: the study's output directory (stages in ``root/stages``, the log in ``root/study.log``).
        total: the number of stages, for the ``[i/N]`` progress lines.
        after_stage: called with each stage's name after it ran.
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
        """The directory of stage ``name``.

        Args:
            name: the stage name.

        Returns:
            Its directory (``+`` spelled ``_``).
        """
        return str(self.dir / name.replace("+", "_"))

    def run(
        self, name: str, options: dict, deps: list[str], fn: Callable[[str], object], what: str = ""
    ) -> str:
        """Run ``fn(tmpdir)`` unless ``stage.json`` in the stage dir holds the same key; return the dir.

        Args:
            name: the stage name.
            options: its own options (hashed).
            deps: the stages it reads (their keys are hashed).
            fn: writes the stage into the directory it is given.
            what: what the progress line says it does.

        Returns:
            The stage's directory.
        """
        self.count += 1
        key = stable_hash({"options": options, "deps": {d: self.keys[d] for d in deps}})
        final = Path(self.path(name))
        meta_path = final / "stage.json"
        label = f"[{self.count}/{self.total}] {name}"
        why = ""
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("key") == key:
                self.keys[name] = meta.get("instance", key)
                print(
                    f"{label}: cached ({format_duration(meta.get('elapsed_s', 0))} when it ran)",
                    flush=True,
                )
                return str(final)
            changed = sorted(
                k
                for k in set(options) | set(meta.get("options", {}))
                if options.get(k) != meta.get("options", {}).get(k)
            )
            changed += sorted(d for d in deps if meta.get("deps", {}).get(d) != self.keys[d])
            why = f" (recomputing: {', '.join(changed) or 'changed'} changed)"
        print(f"{label}: {what or 'running'}{why} ...", flush=True)
        t0 = time.time()
        with atomic_dir(
            str(final), overwrite=True
        ) as tmp:  # a killed stage leaves only a .tmp-* dir
            fn(tmp)
            elapsed = time.time() - t0
            meta = {
                "stage": name,
                "key": key,
                "options": options,
                "deps": {d: self.keys[d] for d in deps},
                "elapsed_s": round(elapsed, 2),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            # what the stages that read this one depend on: this run of it, so that a stage run again (its
            # directory deleted to re-time the speed, say) recomputes what was built from it
            meta["instance"] = stable_hash({"key": key, "run": time.time_ns()})
            atomic_write_json(os.path.join(tmp, "stage.json"), meta, default=str)
        self.keys[name] = meta["instance"]
        with open(self.root / "study.log", "a", encoding="utf-8") as f:
            f.write(
                json.dumps(
                    {
                        "stage": name,
                        "key": key,
                        "elapsed_s": round(elapsed, 2),
                        "finished": meta["finished"],
                    }
                )
                + "\n"
            )
        print(
            f"{label}: done in {format_duration(elapsed)} (study at {format_duration(time.time() - self.start)})",
            flush=True,
        )
        if self.after_stage is not None:
            self.after_stage(name)
        return str(final)

    def publish_report(
        self, version: int, deps: list[str], write: Callable[[str], None], output: str
    ) -> None:
        """The study's last stage: ``write(stage dir)`` writes ``report.{md,json,png}`` (the stage
        ``report``, redone when ``version`` changes), copied into ``output``; ``report.md`` and the study's
        time are printed.

        Args:
            version: the report format's version (a new one rewrites older reports).
            deps: the stages the report reads.
            write: writes the three files into the stage's directory.
            output: the study's output directory.
        """
        rd = self.run("report", {"v": version}, deps, write, "writing the report")
        for fname in ("report.md", "report.json", "report.png"):
            shutil.copyfile(os.path.join(rd, fname), os.path.join(output, fname))
        with open(os.path.join(output, "report.md")) as f:
            print("\n" + f.read(), flush=True)
        print(
            f"lmkd study: finished in {format_duration(time.time() - self.start)}; report in "
            f"{output}/report.md",
            flush=True,
        )

    def run_jobs(self, jobs: list[Job], workers: int = 1) -> dict[str, str]:
        """Run every :class:`Job` (each one a :meth:`run`, cached the same way); returns ``{name: dir}``.

        ``workers`` 1: one after the other, in this process.  More: up to ``workers`` jobs at a time,
        each in a ``python -m lmkd.study.worker`` process on ``threads_per_worker(workers)`` threads
        (the small study models barely use a second thread, so two one-thread trainings on two cores
        take about the time of one), its output in ``ROOT/logs/NAME.log``.  A job starts once the jobs
        it depends on (``deps`` naming another job of the list) are done, costliest first.  A failed job
        lets the running ones finish (their stages are kept), starts no other, and is raised.

        Args:
            jobs: the jobs.
            workers: how many run at a time.

        Returns:
            ``{name: stage dir}``.
        """
        names = {j.name for j in jobs}
        if workers <= 1:
            for j in jobs:
                j.dir = self.run(
                    j.name,
                    j.options,
                    j.deps,
                    lambda out, j=j: call_job(j.call, j.kwargs, out),
                    j.what,
                )
            return {j.name: j.dir for j in jobs}
        threads = threads_per_worker(workers)
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        pending, running, done = list(jobs), {}, set()
        failure: BaseException | None = None
        with ThreadPoolExecutor(workers) as pool:
            while pending or running:
                ready = [j for j in pending if all(d in done or d not in names for d in j.deps)]
                if failure is None:
                    for j in sorted(ready, key=lambda j: -j.cost)[: workers - len(running)]:
                        pending.remove(j)
                        fn = lambda out, j=j: _run_worker(
                            j, out, threads, logs / f"{j.name.replace('+', '_')}.log"
                        )
                        running[pool.submit(self.run, j.name, j.options, j.deps, fn, j.what)] = j
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    j = running.pop(fut)
                    try:
                        j.dir = fut.result()
                        done.add(j.name)
                    except BaseException as e:  # noqa: BLE001 -- re-raised once the running jobs are done
                        failure = failure or e
        if failure is not None:
            raise failure
        return {j.name: j.dir for j in jobs}


def threads_per_worker(workers: int) -> int:
    """Torch threads of each of ``workers`` worker processes: the cores shared out, at least one.

    Args:
        workers: the worker processes.

    Returns:
        The threads of each.
    """
    return max(1, (os.cpu_count() or 1) // workers)


def _run_worker(job: Job, out: str, threads: int, log: Path) -> None:
    """``job`` in a ``python -m lmkd.study.worker`` process writing into ``out``; its output goes to
    ``log``.  A worker's one-line user error (exit 2) is raised as that line; any other failure names
    the log."""
    spec = os.path.join(out, ".job.json")
    atomic_write_json(
        spec, {"call": job.call, "kwargs": job.kwargs, "threads": threads}, default=_jsonable
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "lmkd.study.worker", spec, out],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    os.remove(spec)
    if proc.returncode != 0:
        lines = [
            ln
            for ln in log.read_text(encoding="utf-8", errors="replace").splitlines()
            if ln.strip()
        ]
        last = lines[-1] if lines else "(no output)"
        if proc.returncode == 2 and last.startswith("lmkd: error: "):
            raise LmkdError(last[len("lmkd: error: ") :])
        raise RuntimeError(
            f"study stage {job.name} failed (exit {proc.returncode}): {last} -- whole log: {log}"
        )
