"""`init()` and the Session: where data lives, how tasks run, and the readers that start a DataFrame.

Every setting is resolved as argument > environment variable > default:

| argument | environment | default |
|---|---|---|
| `job_id` | `SP_JOBID` | a new timestamped id; pass the same id again to resume a job from its checkpoints |
| `data_root` | `SP_DATA_ROOT` | `~/.seekstack/dataframe` (a local path, or an fsspec URL such as `3fs:///sp`) |
| `storage_options` | `SP_STORAGE_OPTIONS` (JSON) | `{"3fs": {"data": $SEEKSTACK_FS_DATA}}` if that is set, else none |
| `num_executors` | `SP_NUM_EXECUTORS` | number of CPUs; 0 runs tasks inline in this process |
| `ray_address` | `SP_RAY_ADDRESS` | none: the local process pool; `"local"` starts Ray on 127.0.0.1 |
| `task_threads` | `SP_TASK_THREADS` | 1 DuckDB thread per task |
| `task_memory` | `SP_TASK_MEMORY` | 80 % of RAM divided by the executors, e.g. `"2GB"` |
| `max_retries` | `SP_MAX_RETRIES` | 5 retries per task for retryable failures |
| `fault_inject_prob` | `SP_FAULT_INJECT_PROB` | 0.0 (tests make attempts fail on purpose; 1.0: all but the last) |
| `seed` | `SP_SEED` | 0 (random_shuffle and fault injection repeat for the same job id and inputs) |

>>> import tempfile
>>> sp = init(data_root=tempfile.mkdtemp(), num_executors=0)
>>> df = sp.from_items([{"x": 1}, {"x": 2}, {"x": 3}])
>>> sp.partial_sql("SELECT sum(x) AS s FROM {0}", df).take_all()
[{'s': 6}]
>>> sp.shutdown()

Storage: every path (`data_root`, readers, `write_parquet`) may be local or a `3fs://` URL of a `seekstack.fs`
cluster, mixed freely. `storage_options` says how to reach it, ``{"3fs": {"data": DIR}}`` (the `--data DIR` of
`seekstack fs up`) or ``{"3fs": {"mgmtd": "127.0.0.1:PORT", "token": TOKEN}}``; worker processes and Ray tasks
receive it with their settings, so they connect to the same cluster.

>>> # sp = init(data_root="3fs:///sp", storage_options={"3fs": {"data": "/tmp/3fs"}})
>>> # sp.read_parquet("3fs:///in/*.parquet").repartition(4, hash_by="k").write_parquet("3fs:///out")
"""

from __future__ import annotations

import atexit
import datetime
import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field

import pyarrow as pa

from seekstack.dataframe import io
from seekstack.dataframe.dataframe import DataFrame
from seekstack.dataframe.execution.driver import Driver
from seekstack.dataframe.execution.runner import RunSettings
from seekstack.dataframe.logical.nodes import SourceNode, SqlNode
from seekstack.dataframe.logical.optimizer import optimize
from seekstack.dataframe.logical.planner import Partitions


def _setting(value, env: str, default, cast):
    if value is not None:
        return value
    raw = os.environ.get(env)
    if raw is not None and raw != "":
        try:
            return cast(raw)
        except ValueError as e:
            raise ValueError(f"{env}={raw!r} is not a valid value: {e}") from e
    return default() if callable(default) else default


def _default_memory(num_executors: int) -> str:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):  # pragma: no cover
        total = 8 << 30
    return f"{max(256, int(total * 0.8 / max(1, num_executors)) >> 20)}MB"


def _default_storage_options() -> dict:
    # Made explicit (rather than left to seekstack.fs' own default) so Ray workers on other machines, whose
    # environment may differ, still find the cluster.
    data = os.environ.get("SEEKSTACK_FS_DATA")
    return {"3fs": {"data": os.path.abspath(data)}} if data else {}


@dataclass
class Session:
    """A job: its data directory, its executor and its settings (see `init`)."""

    job_id: str
    data_root: str
    num_executors: int
    ray_address: str | None
    task_threads: int
    task_memory: str
    max_retries: int
    fault_inject_prob: float
    fault_inject_kill: bool
    seed: int
    optimize: bool = True
    storage_options: dict = field(default_factory=dict)
    _executor: object = field(default=None, repr=False)
    _ray_started: bool = field(default=False, repr=False)
    last_stats: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not isinstance(self.num_executors, int) or self.num_executors < 0:
            raise ValueError(f"num_executors must be an integer >= 0, got {self.num_executors!r}")
        # 1.0 is allowed: the last allowed attempt is never injected, so it means "every attempt but the last fails",
        # the one fault schedule that does not depend on the task keys (which hash the job id and input paths).
        if not 0.0 <= self.fault_inject_prob <= 1.0:
            raise ValueError(f"fault_inject_prob must be in [0, 1], got {self.fault_inject_prob}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        self.storage_options = io.check_storage_options(self.storage_options)
        self._use_storage()
        io.makedirs(self.tasks_dir)
        io.makedirs(self.sources_dir)

    def _use_storage(self) -> None:
        # The options live per process (in `io`); set them again before each use, in case another session in this
        # process pointed the same protocol elsewhere.
        io.configure(self.storage_options)

    # -- layout --------------------------------------------------------------------------------------------
    @property
    def job_dir(self) -> str:
        return io.join(self.data_root, self.job_id)

    @property
    def tasks_dir(self) -> str:
        return io.join(self.job_dir, "tasks")

    @property
    def sources_dir(self) -> str:
        return io.join(self.job_dir, "sources")

    # -- readers -------------------------------------------------------------------------------------------
    def read_parquet(
        self, paths, recursive: bool = False, columns: list[str] | None = None, union_by_name: bool = False
    ) -> DataFrame:
        """Parquet files (paths, directories, globs) as one partition; `repartition` spreads them.

        >>> df = sp.read_parquet("data/*.parquet")  # doctest: +SKIP
        """
        self._use_storage()
        files = io.expand_paths(paths, recursive=recursive, suffixes=(".parquet",))
        options = {"union_by_name": union_by_name} if union_by_name else {}
        if columns:
            options["columns"] = list(columns)
        return DataFrame(self, SourceNode("read_parquet", files, "parquet", options))

    def read_csv(
        self,
        paths,
        schema: dict[str, str] | None = None,
        delim: str = ",",
        header: bool = True,
        recursive: bool = False,
    ) -> DataFrame:
        """CSV files; `schema` maps column names to DuckDB types (else types are sniffed)."""
        self._use_storage()
        files = io.expand_paths(paths, recursive=recursive)
        options: dict = {"delim": delim, "header": header}
        if schema:
            options["columns"] = dict(schema)
        return DataFrame(self, SourceNode("read_csv", files, "csv", options))

    def read_json(self, paths, schema: dict[str, str] | None = None, recursive: bool = False) -> DataFrame:
        """Newline-delimited (or array) JSON files; `schema` maps column names to DuckDB types."""
        self._use_storage()
        files = io.expand_paths(paths, recursive=recursive)
        options = {"columns": dict(schema)} if schema else {}
        return DataFrame(self, SourceNode("read_json", files, "json", options))

    def from_arrow(self, table: pa.Table) -> DataFrame:
        """An in-memory arrow table, stored once as parquet under the job's `sources/` directory."""
        if not isinstance(table, pa.Table):
            raise ValueError(f"table: expected a pyarrow.Table, got {type(table).__name__}")
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
        digest = hashlib.sha1(sink.getvalue().to_pybytes()).hexdigest()[:20]
        self._use_storage()
        path = io.join(self.sources_dir, f"{digest}.parquet")
        if not io.exists(path):
            tmp = io.temp_name(path)
            writer = io.parquet_writer(tmp, table.schema, compression="zstd")
            writer.write_table(table)
            writer.close()
            io.rename(tmp, path)
        return DataFrame(self, SourceNode("from_arrow", [path], "parquet"))

    def from_pandas(self, df) -> DataFrame:
        """A pandas DataFrame (its index is dropped)."""
        return self.from_arrow(pa.Table.from_pandas(df, preserve_index=False))

    def from_items(self, items: list) -> DataFrame:
        """A list of dicts (one row each), or of plain values (one column named ``item``)."""
        items = list(items)
        if not items:
            raise ValueError("items: expected a non-empty list")
        if all(isinstance(x, dict) for x in items):
            return self.from_arrow(pa.Table.from_pylist(items))
        return self.from_arrow(pa.table({"item": items}))

    def partial_sql(self, query: str, *inputs: DataFrame) -> DataFrame:
        """Run `query` on every partition; ``{0}``, ``{1}``, ... are partition p of each input, which must all have
        the same number of partitions (e.g. both hash-partitioned by the join key).

        >>> sp.partial_sql("SELECT a.k, a.x, b.y FROM {0} a JOIN {1} b USING (k)", df1, df2)  # doctest: +SKIP
        """
        from seekstack.dataframe.execution.duck import placeholders

        if not isinstance(query, str) or not query.strip():
            raise ValueError("query: expected a non-empty SQL string")
        if not inputs or not all(isinstance(d, DataFrame) for d in inputs):
            raise ValueError("inputs: expected at least one DataFrame")
        used = placeholders(query)
        if used and max(used) >= len(inputs):
            raise ValueError(f"query: uses {{{max(used)}}} but only {len(inputs)} input DataFrame(s) were given")
        counts = [d.num_partitions for d in inputs]
        if len(set(counts)) != 1:
            raise ValueError(f"inputs: must have the same number of partitions, got {counts}")
        return DataFrame(self, SqlNode("partial_sql", [d._node for d in inputs], query))

    # -- execution -----------------------------------------------------------------------------------------
    def _settings(self) -> RunSettings:
        return RunSettings(
            threads=self.task_threads,
            memory_limit=self.task_memory,
            seed=self.seed,
            max_retries=self.max_retries,
            fault_inject_prob=self.fault_inject_prob,
            fault_inject_kill=self.fault_inject_kill,
            storage_options=self.storage_options or None,
        )

    def _get_executor(self):
        if self._executor is None:
            if self.ray_address:
                from seekstack.dataframe.execution.ray_executor import RayExecutor, start_ray

                self._ray_started = start_ray(self.ray_address, self.num_executors or None)
                self._executor = RayExecutor(self._settings())
            else:
                from seekstack.dataframe.execution.local import LocalExecutor

                self._executor = LocalExecutor(self.num_executors, self._settings())
        return self._executor

    def _compute(self, node) -> Partitions:
        self._use_storage()
        plan = optimize(node, fuse=self.optimize, prune=self.optimize)
        driver = Driver(self._get_executor(), self.tasks_dir, self.max_retries)
        try:
            return driver.compute(plan)
        finally:
            self.last_stats = dict(driver.stats)

    def shutdown(self) -> None:
        """Stop the worker processes (and Ray, if this session started it)."""
        if self._executor is not None:
            self._executor.shutdown()
            self._executor = None
        if self._ray_started:
            import ray

            ray.shutdown()
            self._ray_started = False

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


def init(
    job_id: str | None = None,
    data_root: str | None = None,
    num_executors: int | None = None,
    ray_address: str | None = None,
    task_threads: int | None = None,
    task_memory: str | None = None,
    max_retries: int | None = None,
    fault_inject_prob: float | None = None,
    fault_inject_kill: bool = False,
    seed: int | None = None,
    optimize: bool = True,
    storage_options: dict | None = None,
) -> Session:
    """Start a session; see the module docstring for each setting's environment variable and default.

    >>> import seekstack.dataframe as sp  # doctest: +SKIP
    >>> session = sp.init(data_root="/tmp/sp", num_executors=2)  # doctest: +SKIP
    """
    job_id = _setting(
        job_id,
        "SP_JOBID",
        lambda: datetime.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:8],
        str,
    )
    if not job_id or "/" in job_id:
        raise ValueError(f"job_id must be a non-empty name without '/', got {job_id!r}")
    data_root = _setting(data_root, "SP_DATA_ROOT", os.path.expanduser("~/.seekstack/dataframe"), str)
    num_executors = _setting(num_executors, "SP_NUM_EXECUTORS", lambda: os.cpu_count() or 1, int)
    storage_options = _setting(storage_options, "SP_STORAGE_OPTIONS", _default_storage_options, json.loads)
    session = Session(
        job_id=job_id,
        data_root=data_root,
        num_executors=num_executors,
        ray_address=_setting(ray_address, "SP_RAY_ADDRESS", None, str),
        task_threads=_setting(task_threads, "SP_TASK_THREADS", 1, int),
        task_memory=_setting(task_memory, "SP_TASK_MEMORY", lambda: _default_memory(num_executors), str),
        max_retries=_setting(max_retries, "SP_MAX_RETRIES", 5, int),
        fault_inject_prob=_setting(fault_inject_prob, "SP_FAULT_INJECT_PROB", 0.0, float),
        fault_inject_kill=fault_inject_kill,
        seed=_setting(seed, "SP_SEED", 0, int),
        optimize=optimize,
        storage_options=storage_options,
    )
    atexit.register(session.shutdown)
    return session
