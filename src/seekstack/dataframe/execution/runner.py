"""Runs one task in a worker: checkpoint check, clean start, fault injection, the task, the commit.

A task's directory becomes valid only when its manifest (``_SUCCESS.json``, written atomically) appears; a worker
killed before that leaves files that no one reads, and the next attempt wipes them. So a rerun of a job skips
finished tasks, and a crash never exposes partial output.
"""

from __future__ import annotations

import os
import random
import socket
import time
import traceback
from dataclasses import dataclass

import duckdb

from seekstack.dataframe import io, serialize
from seekstack.dataframe.errors import InjectedFault, SchemaMismatchError
from seekstack.dataframe.execution.tasks import Task, TaskContext

MANIFEST = "_SUCCESS.json"


@dataclass(frozen=True)
class RunSettings:
    """Per-worker limits and the fault-injection knob.

    fault_inject_prob: chance that an attempt fails after doing its work but before committing it (never on the
    last allowed attempt, so a job with retries still finishes; 1.0 fails every attempt but the last). The draw
    hashes the seed, the task key (which names the job's paths) and the attempt, so a given seed repeats its faults
    only for the same job id and inputs. fault_inject_kill: the failure kills the worker process (``os._exit``)
    instead of raising, as a crashed machine would.
    """

    threads: int = 1
    memory_limit: str | None = None
    seed: int = 0
    max_retries: int = 3
    fault_inject_prob: float = 0.0
    fault_inject_kill: bool = False
    in_worker: bool = True
    storage_options: dict | None = None  # {protocol: fsspec options}: how a worker reaches e.g. a 3fs:// cluster


def manifest_path(task: Task) -> str:
    return io.join(task.out_dir, MANIFEST)


def load_checkpoint(task: Task) -> list[list[str]] | None:
    """The outputs of a finished task, or None if it has not committed."""
    path = manifest_path(task)
    if not io.exists(path):
        return None
    outputs = io.read_json(path)["outputs"]
    if all(io.exists(f) for part in outputs for f in part):
        return outputs
    return None


def execute(blob: bytes, attempt: int, settings: RunSettings) -> tuple:
    """Worker entry point. Returns ``("ok", outputs)`` or ``("err", type, message, retryable, traceback)``;
    exceptions are flattened to text because not every library exception pickles."""
    io.configure(settings.storage_options)
    task = serialize.loads(blob)
    try:
        done = load_checkpoint(task)
        if done is not None:
            return ("ok", done)
        io.remove_tree(task.out_dir)  # leftovers of an attempt that died before its commit
        io.makedirs(task.out_dir)
        ctx = TaskContext(settings.threads, settings.memory_limit, settings.seed, attempt)
        started = time.time()
        outputs = task.run(ctx)
        _maybe_inject(task, attempt, settings)
        # Timing and worker id make a job's schedule visible afterwards (stragglers, idle workers, barriers).
        manifest = {"step": task.step, "index": task.index, "outputs": outputs}
        manifest.update(started=started, finished=time.time(), worker=f"{socket.gethostname()}:{os.getpid()}")
        io.write_json_atomic(manifest_path(task), manifest)
        return ("ok", outputs)
    except Exception as exc:  # noqa: BLE001 - every failure is reported to the driver, which decides on retries
        return ("err", type(exc).__name__, str(exc), _retryable(exc), traceback.format_exc())


def _maybe_inject(task: Task, attempt: int, settings: RunSettings) -> None:
    if settings.fault_inject_prob <= 0 or attempt >= settings.max_retries:
        return
    if random.Random(f"{settings.seed}:{task.key}:{attempt}").random() >= settings.fault_inject_prob:
        return
    if settings.fault_inject_kill and settings.in_worker:
        os._exit(17)  # the worker dies with output written but not committed
    raise InjectedFault(f"injected fault (attempt {attempt})")


def _retryable(exc: Exception) -> bool:
    """User errors (bad SQL, missing columns, schema mismatches, missing files) fail the same way every time."""
    return not isinstance(exc, duckdb.ProgrammingError | SchemaMismatchError | FileNotFoundError | TypeError)
