"""The Arrow engine for ``repartition(n, by=column)`` (smallpond's ShuffleNode with ``engine_type="arrow"``).

When the partition id is already a column, routing a row needs no SQL: each input row group is read with pyarrow,
its rows are grouped by id with one stable sort, and the groups are appended to one parquet writer per bucket, so
every input is read once and all its buckets are written in the same pass. Fixed-size binary columns (GraySort's
keys and records) stay fixed-size end to end, which makes the gather a plain memory copy; DuckDB's ``COPY ...
PARTITION_BY`` would turn them into variable-length BLOBs and compute statistics and dictionaries for each value.

Rows keep their input order within a bucket. Memory stays bounded: pending rows are flushed to the writers once
they pass `FLUSH_BYTES`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from seekstack.dataframe import io

FLUSH_BYTES = 128 << 20
BATCH_ROWS = 1 << 17
ROW_GROUP_ROWS = 1 << 20


def usable(schema: pa.Schema, key: str) -> bool:
    """This engine handles integer partition columns; anything else (strings, floats, missing) goes to DuckDB,
    whose CAST rules and error messages then apply."""
    return key in schema.names and pa.types.is_integer(schema.field(key).type)


def shuffle_by_column(
    files: list[str],
    key: str,
    npartitions: int,
    columns: list[str] | None,
    output_path,
) -> list[list[str]]:
    """Split `files` by the partition ids in `key`; `output_path(name)` names the final file of each bucket.

    Returns one single-file list per bucket (empty buckets get an empty file with the schema).
    """
    schema = io.parquet_schema(files[0]).remove_metadata()
    names = list(columns or schema.names)
    out_schema = pa.schema([schema.field(c) for c in names])
    options = writer_options(out_schema)
    read_cols = names if key in names else [*names, key]
    finals = [output_path(f"bucket-{j}-0.parquet") for j in range(npartitions)]
    temps = [io.temp_name(f) for f in finals]
    writers: dict[int, pq.ParquetWriter] = {}
    pending: list[list[pa.RecordBatch]] = [[] for _ in range(npartitions)]
    pending_bytes = 0

    def flush() -> None:
        nonlocal pending_bytes
        for j, batches in enumerate(pending):
            if batches:
                if j not in writers:
                    writers[j] = io.parquet_writer(temps[j], out_schema, **options)
                writers[j].write_table(pa.Table.from_batches(batches), row_group_size=ROW_GROUP_ROWS)
                batches.clear()
        pending_bytes = 0

    try:
        for path in files:
            with io.open_input(path) as f, pq.ParquetFile(f) as pf:
                for batch in pf.iter_batches(BATCH_ROWS, columns=read_cols, use_threads=False):
                    ids = _partition_ids(batch.column(key), key, npartitions)
                    order = np.argsort(ids, kind="stable")
                    bounds = np.searchsorted(ids[order], np.arange(npartitions + 1))
                    routed = batch.select(names).take(pa.array(order))
                    for j in np.flatnonzero(np.diff(bounds)):
                        pending[j].append(routed.slice(bounds[j], bounds[j + 1] - bounds[j]))
                    pending_bytes += routed.nbytes
                    if pending_bytes >= FLUSH_BYTES:
                        flush()
        flush()
        for j in range(npartitions):
            if j not in writers:  # keep the schema visible downstream even when a bucket is empty
                writers[j] = io.parquet_writer(temps[j], out_schema, **options)
            writers.pop(j).close()
    finally:
        for w in writers.values():
            w.close()
    for tmp, final in zip(temps, finals, strict=True):
        io.rename(tmp, final)
    return [[f] for f in finals]


def _partition_ids(column: pa.Array, key: str, npartitions: int) -> np.ndarray:
    if column.null_count:
        raise ValueError(f"by: column {key!r} must hold partition ids in [0, {npartitions}), found NULL")
    ids = column.to_numpy(zero_copy_only=False)
    if len(ids) and (ids.min() < 0 or ids.max() >= npartitions):
        bad = ids[(ids < 0) | (ids >= npartitions)][0]
        raise ValueError(f"by: column {key!r} must hold partition ids in [0, {npartitions}), found {bad}")
    return ids.astype(np.int64, copy=False)


def writer_options(schema: pa.Schema) -> dict:
    """Raw pages (read once, soon); no dictionaries or statistics for binary columns, where values are mostly
    unique and both would be built for nothing."""
    binary = [
        f.name
        for f in schema
        if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) or pa.types.is_fixed_size_binary(f.type)
    ]
    others = [n for n in schema.names if n not in binary]
    return {
        "compression": "none",
        "use_dictionary": others,
        "write_statistics": others,
    }
