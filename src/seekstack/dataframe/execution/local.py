"""The embedded executor: a pool of worker processes on this machine (no services to start).

``num_executors=0`` runs tasks inline in the calling process, which is handy for debugging.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace

from seekstack.dataframe.execution.runner import RunSettings, execute


def _init_worker(threads: int) -> None:
    # Arrow and BLAS pools would otherwise start one thread per core in every worker.
    for var in ("OMP_NUM_THREADS", "ARROW_NUM_THREADS", "POLARS_MAX_THREADS"):
        os.environ[var] = str(threads)
    try:
        import pyarrow as pa

        pa.set_cpu_count(threads)
        pa.set_io_thread_count(max(threads, 2))
    except ImportError:  # pragma: no cover
        pass
    # Import what every task needs now, while the pool starts, rather than inside the first task each worker gets
    # (~1 s of duckdb/pyarrow imports that would otherwise delay that task and everything waiting on it).
    import seekstack.dataframe.execution.tasks  # noqa: F401


@contextlib.contextmanager
def _without_main_script():
    """Spawned workers normally re-run the parent's ``__main__`` script, which breaks scripts without an
    ``if __name__ == "__main__"`` guard. Workers never need it (user functions travel pickled by value), so the
    script path is hidden while workers start."""
    main = sys.modules.get("__main__")
    if main is None or getattr(main, "__spec__", None) is not None or not hasattr(main, "__file__"):
        yield
        return
    path = main.__file__
    del main.__file__
    try:
        yield
    finally:
        main.__file__ = path


class LocalExecutor:
    """Runs task batches on `num_executors` spawned processes; a crashed worker fails only its own batch."""

    def __init__(self, num_executors: int, settings: RunSettings):
        self.num_executors = num_executors
        self.settings = settings
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.num_executors,
                mp_context=mp.get_context("spawn"),  # fork is unsafe once DuckDB/Arrow threads exist
                initializer=_init_worker,
                initargs=(self.settings.threads,),
            )
            # The pool spawns workers on demand, one per submit that finds none idle; starting all of them now (in
            # parallel, imports included) keeps the spawn out of the first job's steps.
            for fut in [self._pool.submit(os.getpid) for _ in range(self.num_executors)]:
                fut.result()
        return self._pool

    def run_many(self, items: list[tuple[bytes, int]]) -> list[tuple]:
        if self.num_executors == 0:
            inline = replace(self.settings, in_worker=False)
            return [execute(blob, attempt, inline) for blob, attempt in items]
        with _without_main_script():
            pool = self._get_pool()
            futures = [pool.submit(execute, blob, attempt, self.settings) for blob, attempt in items]
        outcomes, broken = [], False
        for fut in futures:
            try:
                outcomes.append(fut.result())
            except BrokenProcessPool as exc:
                broken = True
                outcomes.append(("err", "WorkerDied", f"a worker process died: {exc}", True, ""))
        if broken:  # start fresh workers for the retries
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        return outcomes

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for CPU accounting in benchmarks); empty before the first job."""
        return [] if self._pool is None else list(getattr(self._pool, "_processes", None) or {})

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
