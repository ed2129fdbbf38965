"""Tasks: the unit of execution. Each reads parquet files (one list per input), runs in a fresh DuckDB connection
and writes parquet files into its own directory, each under a temporary name and renamed when complete.

A task returns its output partitions as lists of files; `runner.execute` records them in a manifest, which is the
task's checkpoint.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field

import pyarrow as pa

from seekstack.dataframe import io
from seekstack.dataframe.errors import SchemaMismatchError
from seekstack.dataframe.execution import arrow_shuffle, duck


@dataclass
class TaskContext:
    """What a worker grants a task: DuckDB threads and memory, a seed for random steps, the attempt number."""

    threads: int = 1
    memory_limit: str | None = None
    seed: int = 0
    attempt: int = 0


@dataclass
class Task:
    step: str  # the plan node's label, named in errors
    index: int  # partition (or producer) index within the step
    key: str  # deterministic: same inputs and parameters give the same key, so reruns find the checkpoint
    out_dir: str
    inputs: list[list[str]] = field(default_factory=list)

    def run(self, ctx: TaskContext) -> list[list[str]]:
        raise NotImplementedError

    def output_path(self, name: str) -> str:
        return io.join(self.out_dir, name)

    def connect(self, ctx: TaskContext):
        paths = [f for files in self.inputs for f in files] + [self.out_dir]
        return duck.connect(ctx.threads, ctx.memory_limit, paths)


@dataclass
class SqlTask(Task):
    """One partition of a SQL step: `query` with ``{i}`` standing for input i."""

    query: str = ""
    union_by_name: bool = False
    source_files: list[str] = field(default_factory=list)  # files a reader query names itself (CSV, JSON)

    def connect(self, ctx: TaskContext):
        paths = [f for files in self.inputs for f in files] + [self.out_dir, *self.source_files]
        return duck.connect(ctx.threads, ctx.memory_limit, paths)

    def run(self, ctx: TaskContext) -> list[list[str]]:
        con = self.connect(ctx)
        try:
            con.execute(f"SELECT setseed({_unit_seed(ctx.seed, self.key)})")
            names = duck.register_inputs(con, self.inputs, union_by_name=self.union_by_name)
            final = self.output_path("part-0.parquet")
            tmp = io.temp_name(final)
            duck.copy_to_parquet(con, duck.substitute(self.query, names), tmp)
            io.rename(tmp, final)
        finally:
            duck.close(con)
        return [[final]]


PID = "__seekstack_pid__"
# Shuffle files are written once and read once, soon after, from the page cache or a fast shared file system: raw
# pages cost the least CPU on both sides (GraySort: ~20 % less shuffle CPU than snappy with dictionaries). A small
# dictionary limit keeps dictionaries for low-cardinality columns but makes DuckDB give up early on unique values
# (random keys), where building one is wasted work.
SHUFFLE_PARQUET_OPTIONS = "COMPRESSION uncompressed, DICTIONARY_SIZE_LIMIT 4096"


@dataclass
class PartitionTask(Task):
    """Splits one input partition into `npartitions` buckets (one parquet file each, empty buckets included).

    mode: ``hash`` (hash of `keys` mod n), ``column`` (the value of `keys[0]` is the bucket), ``random`` or
    ``rows`` (round-robin by row number, starting at `offset`). `columns` limits what is written (column pruning).
    """

    npartitions: int = 1
    mode: str = "hash"
    keys: list[str] = field(default_factory=list)
    columns: list[str] | None = None
    offset: int = 0

    def pid_expr(self) -> str:
        n = self.npartitions
        if self.mode == "hash":
            return f"(hash({', '.join(duck.quote(k) for k in self.keys)}) % {n})::BIGINT"
        if self.mode == "column":
            return f"CAST({duck.quote(self.keys[0])} AS BIGINT)"
        if self.mode == "random":
            return f"CAST(floor(random() * {n}) AS BIGINT)"
        if self.mode == "rows":
            return f"((row_number() OVER () - 1 + {self.offset}) % {n})::BIGINT"
        raise ValueError(f"mode: unknown partition mode {self.mode!r}")

    def run(self, ctx: TaskContext) -> list[list[str]]:
        if self.mode == "column":
            files = duck.usable_files(self.inputs[0])
            if files and arrow_shuffle.usable(io.parquet_schema(files[0]), self.keys[0]):
                duck.check_same_schema(files, "input {0}")
                return arrow_shuffle.shuffle_by_column(
                    files, self.keys[0], self.npartitions, self.columns, self.output_path
                )
        con = self.connect(ctx)
        try:
            con.execute(f"SELECT setseed({_unit_seed(ctx.seed, self.key)})")
            (view,) = duck.register_inputs(con, self.inputs)
            cols = "*" if self.columns is None else ", ".join(duck.quote(c) for c in self.columns)
            query = f"SELECT {cols}, {self.pid_expr()} AS {PID} FROM {view}"
            schema = con.sql(f"SELECT {cols} FROM {view} LIMIT 0").to_arrow_table().schema
            staging = self.output_path(".staging")
            io.remove_tree(staging)
            target = staging.replace("'", "''")
            con.execute(
                f"COPY ({query}) TO '{target}' (FORMAT parquet, {SHUFFLE_PARQUET_OPTIONS}, PARTITION_BY ({PID}), "
                "OVERWRITE_OR_IGNORE true)"
            )
        finally:
            duck.close(con)
        return self._commit_buckets(staging, schema)

    def _commit_buckets(self, staging: str, schema: pa.Schema) -> list[list[str]]:
        found: dict[int, list[str]] = {}
        fs_listing = _list_dirs(staging)
        for dirname, files in fs_listing:
            value = dirname.split("=", 1)[1]
            if not value.lstrip("-").isdigit() or not 0 <= int(value) < self.npartitions:
                raise ValueError(
                    f"by: column {self.keys[0]!r} must hold partition ids in [0, {self.npartitions}), found {value}"
                    if self.mode == "column"
                    else f"internal: bad bucket {value}"
                )
            found[int(value)] = [io.join(staging, dirname, f) for f in sorted(files)]
        outputs: list[list[str]] = []
        for j in range(self.npartitions):
            final_files = []
            for k, src in enumerate(found.get(j, [])):
                dst = self.output_path(f"bucket-{j}-{k}.parquet")
                io.rename(src, dst)
                final_files.append(dst)
            if not final_files:  # keep the schema visible downstream even when a bucket is empty
                dst = self.output_path(f"bucket-{j}-0.parquet")
                tmp = io.temp_name(dst)
                io.parquet_writer(tmp, schema).close()
                io.rename(tmp, dst)
                final_files.append(dst)
            outputs.append(final_files)
        io.remove_tree(staging)
        return outputs


def _list_dirs(staging: str) -> list[tuple[str, list[str]]]:
    if io.is_local(staging):
        if not os.path.isdir(staging):
            return []
        return [(d, os.listdir(os.path.join(staging, d))) for d in sorted(os.listdir(staging))]
    fs = io.filesystem(staging)
    if not fs.exists(staging):
        return []
    out = []
    for d in fs.ls(staging, detail=False):
        out.append((d.rstrip("/").rsplit("/", 1)[-1], [f.rsplit("/", 1)[-1] for f in fs.ls(d, detail=False)]))
    return out


@dataclass
class PythonTask(Task):
    """Runs a Python function over one partition: ``filter``/``map``/``flat_map`` per row (dicts),
    ``map_batches`` per arrow table of up to `batch_size` rows."""

    fn: object = None
    mode: str = "map"
    batch_size: int = 122_880
    schema: pa.Schema | None = None

    def run(self, ctx: TaskContext) -> list[list[str]]:
        con = self.connect(ctx)
        final = self.output_path("part-0.parquet")
        tmp = io.temp_name(final)
        writer = None
        out_schema = self.schema
        try:
            (view,) = duck.register_inputs(con, self.inputs)
            reader = con.sql(f"SELECT * FROM {view}").to_arrow_reader(self.batch_size)
            in_schema = reader.schema
            for batch in reader:
                table = self._apply(batch)
                if table is None or (table.num_rows == 0 and out_schema is None):
                    continue
                if out_schema is None:
                    out_schema = table.schema
                table = _conform(table, out_schema, self.step)
                if writer is None:
                    writer = io.parquet_writer(tmp, out_schema, compression="zstd")
                writer.write_table(table)
            if writer is None:  # no rows at all: an empty file with the best schema we know
                schema = out_schema or (in_schema if self.mode == "filter" else pa.schema([]))
                writer = io.parquet_writer(tmp, schema)
            writer.close()
            writer = None
        finally:
            if writer is not None:
                writer.close()
            duck.close(con)
        io.rename(tmp, final)
        return [[final]]

    def _apply(self, batch: pa.RecordBatch) -> pa.Table | None:
        fn = self.fn
        if self.mode == "map_batches":
            return _to_table(fn(pa.Table.from_batches([batch])))
        rows = batch.to_pylist()
        if self.mode == "filter":
            mask = pa.array([bool(fn(r)) for r in rows], type=pa.bool_())
            return pa.Table.from_batches([batch.filter(mask)])
        if self.mode == "map":
            out = [fn(r) for r in rows]
        elif self.mode == "flat_map":
            out = [x for r in rows for x in fn(r)]
        else:
            raise ValueError(f"mode: unknown python mode {self.mode!r}")
        if not out:
            return None
        return pa.Table.from_pylist(out, schema=self.schema) if self.schema is not None else pa.Table.from_pylist(out)


def _to_table(obj) -> pa.Table | None:
    if obj is None:
        return None
    if isinstance(obj, pa.Table):
        return obj
    if isinstance(obj, pa.RecordBatch):
        return pa.Table.from_batches([obj])
    if isinstance(obj, dict):
        return pa.table(obj)
    if type(obj).__module__.startswith(("pandas", "polars")):
        return pa.Table.from_pandas(obj, preserve_index=False) if hasattr(obj, "iloc") else obj.to_arrow()
    raise TypeError(f"function must return a pyarrow Table/RecordBatch, a dict or a pandas DataFrame, got {type(obj)}")


def _conform(table: pa.Table, schema: pa.Schema, step: str) -> pa.Table:
    if table.schema.equals(schema):
        return table
    try:
        return table.select(schema.names).cast(schema)
    except (KeyError, ValueError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise SchemaMismatchError(
            f"{step}: a batch returned schema ({table.schema}) which does not match earlier batches ({schema}): {e}"
        ) from e


def _unit_seed(seed: int, key: str) -> float:
    """DuckDB's setseed wants a value in [-1, 1]; derive one from the job seed and the task key."""
    return random.Random(f"{seed}:{key}").uniform(-1.0, 1.0)
