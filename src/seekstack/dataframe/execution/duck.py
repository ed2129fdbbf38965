"""A fresh DuckDB connection per task, with thread and memory limits, and the SQL placeholder rules.

Placeholders ``{0}``, ``{1}``, ... name the task's inputs (one partition of each input DataFrame). Only these are
replaced, so SQL with braces of its own (struct literals) is left alone.

>>> substitute("select * from {0} join {1} using (k)", ["a", "b"])
'select * from a join b using (k)'
"""

from __future__ import annotations

import re

import duckdb

from seekstack.dataframe import io
from seekstack.dataframe.errors import SchemaMismatchError

PLACEHOLDER = re.compile(r"\{(\d+)\}")


def placeholders(query: str) -> set[int]:
    return {int(m) for m in PLACEHOLDER.findall(query)}


def substitute(query: str, names: list[str]) -> str:
    def repl(m: re.Match) -> str:
        i = int(m.group(1))
        if i >= len(names):
            raise ValueError(f"query: placeholder {{{i}}} but only {len(names)} input(s) given")
        return names[i]

    return PLACEHOLDER.sub(repl, query)


def connect(threads: int = 1, memory_limit: str | None = None, paths: list[str] = ()) -> duckdb.DuckDBPyConnection:
    """An in-memory connection limited to `threads` and `memory_limit`, able to read `paths`' file systems."""
    config = {"threads": max(1, int(threads))}
    if memory_limit:
        config["memory_limit"] = memory_limit
    con = duckdb.connect(":memory:", config=config)
    con.execute("SET enable_progress_bar = false")
    registered, files = [], []
    for proto in sorted({io.protocol_of(p) for p in paths} - {"file"}):
        fs = io.filesystem(f"{proto}://")
        if not any(fs is r for r in registered):  # 3fs:// and hf3fs:// are one filesystem, registered once
            con.register_filesystem(_tracking(fs, files))
            registered.append(fs)
    _open_files[id(con)] = files
    return con


# DuckDB's fsspec bridge never closes the files it opens for reading; they would be closed by the garbage
# collector, at any time and on any thread, or at interpreter exit (where seekstack.fs' file finalizer hangs). So each
# connection gets a view of the filesystem that records what it opens, and `close` closes those files.
_open_files: dict[int, list] = {}


def _tracking(fs, files: list):
    """A shallow view of `fs` (same client, same connection) whose opened files are appended to `files`."""
    view = object.__new__(type(fs))
    view.__dict__.update(fs.__dict__)
    if hasattr(view, "_owns_client"):
        view._owns_client = False  # the view must never close the shared client
    inner = fs._open

    def _open(path, mode="rb", *args, **kwargs):
        f = inner(path, mode, *args, **kwargs)
        files.append(f)
        return f

    view._open = _open
    return view


def close(con) -> None:
    """Close `con` and every file DuckDB opened through it (see `_tracking`)."""
    try:
        con.close()
    finally:
        errors = []
        for f in _open_files.pop(id(con), []):
            try:
                f.close()
            except Exception as e:  # noqa: BLE001 - close the rest, then report the first failure
                errors.append(e)
        if errors:
            raise errors[0]


def usable_files(files: list[str]) -> list[str]:
    """Drop empty files whose schema may be unknown (a Python step with no output rows), keeping at least one."""
    if len(files) <= 1:
        return list(files)
    rows = [io.parquet_metadata(f).num_rows for f in files]
    kept = [f for f, n in zip(files, rows, strict=True) if n > 0]
    return kept or [max(files, key=lambda f: len(io.parquet_schema(f)))]


def check_same_schema(files: list[str], what: str) -> None:
    """All files of one input must share column names and types (DuckDB would otherwise cast silently or fail late)."""
    if len(files) <= 1:
        return
    first = io.parquet_schema(files[0]).remove_metadata()
    for f in files[1:]:
        s = io.parquet_schema(f).remove_metadata()
        if not s.equals(first):
            raise SchemaMismatchError(
                f"{what}: schemas differ between partitions/files: {files[0]} has ({_fmt(first)}) "
                f"but {f} has ({_fmt(s)})"
            )


def _fmt(schema) -> str:
    return ", ".join(f"{n} {t}" for n, t in zip(schema.names, schema.types, strict=True))


def sql_list(files: list[str]) -> str:
    return "[" + ", ".join("'" + f.replace("'", "''") + "'" for f in files) + "]"


def register_inputs(con, inputs: list[list[str]], *, union_by_name: bool = False, columns=None) -> list[str]:
    """Create one view per input over its parquet files; returns the view names for the placeholders."""
    names = []
    for i, files in enumerate(inputs):
        files = usable_files(files)
        if not files:
            raise ValueError(f"input {i} has no files")
        if not union_by_name:
            check_same_schema(files, f"input {{{i}}}")
        cols = "*" if columns is None else ", ".join(quote(c) for c in columns)
        opt = ", union_by_name=true" if union_by_name else ""
        name = f"__input_{i}"
        con.execute(f"CREATE VIEW {name} AS SELECT {cols} FROM read_parquet({sql_list(files)}{opt})")
        names.append(name)
    return names


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


def copy_to_parquet(con, query: str, path: str, compression: str = "zstd", row_group_size: int = 122_880) -> None:
    """Run `query` and write its result to `path` (one parquet file, schema kept even when empty)."""
    target = path.replace("'", "''")
    query = narrow_hugeint(con, query)
    con.execute(
        f"COPY ({query}) TO '{target}' (FORMAT parquet, COMPRESSION {compression}, ROW_GROUP_SIZE {row_group_size})"
    )


def narrow_hugeint(con, query: str) -> str:
    """Parquet has no 128-bit integer, and DuckDB would store ``sum(int)`` (HUGEINT) as DOUBLE; cast such columns to
    BIGINT instead (an overflow then fails loudly rather than losing precision)."""
    rel = con.sql(f"SELECT * FROM ({query}) LIMIT 0")
    wide = [n for n, t in zip(rel.columns, rel.types, strict=True) if str(t).upper() in ("HUGEINT", "UHUGEINT")]
    if not wide:
        return query
    casts = ", ".join(f"CAST({quote(n)} AS BIGINT) AS {quote(n)}" for n in wide)
    return f"SELECT * REPLACE ({casts}) FROM ({query})"
