"""Output schemas of plan nodes, found without running them: parquet footers for sources, and each SQL step run
by DuckDB over empty tables of its input schemas. This also catches SQL errors (unknown columns, syntax) when the
plan is built, naming the step, before any task runs.
"""

from __future__ import annotations

import pyarrow as pa

from seekstack.dataframe import io
from seekstack.dataframe.errors import StepError
from seekstack.dataframe.execution import duck
from seekstack.dataframe.logical.nodes import Node, PythonNode, RepartitionNode, SourceNode, SqlNode


def infer_schemas(order: list[Node]) -> dict[int, pa.Schema | None]:
    """Schema per node id (None when unknown, e.g. after a Python map without a declared schema)."""
    out: dict[int, pa.Schema | None] = {}
    for node in order:
        out[node.id] = _infer(node, [out[i.id] for i in node.inputs])
    return out


def _infer(node: Node, inputs: list[pa.Schema | None]) -> pa.Schema | None:
    if isinstance(node, SourceNode):
        if node.fmt != "parquet" or node.options.get("union_by_name"):
            return None
        return io.parquet_schema(node.files[0]).remove_metadata()
    if isinstance(node, RepartitionNode):
        s = inputs[0]
        if s is not None and node.columns is not None:
            s = pa.schema([s.field(c) for c in node.columns])
        return s
    if isinstance(node, PythonNode):
        return inputs[0] if node.mode == "filter" else node.schema
    if isinstance(node, SqlNode):
        if any(s is None for s in inputs):
            return None
        return sql_schema(node, inputs)
    return None


def sql_schema(node: SqlNode, inputs: list[pa.Schema]) -> pa.Schema:
    con = duck.connect(1)
    try:
        names = []
        for i, schema in enumerate(inputs):
            name = f"__input_{i}"
            con.register(name, schema.empty_table())
            names.append(name)
        return con.sql(f"SELECT * FROM ({duck.substitute(node.query, names)}) LIMIT 0").to_arrow_table().schema
    except Exception as exc:  # noqa: BLE001 - any DuckDB error here is the user's query
        import duckdb

        if isinstance(exc, duckdb.ProgrammingError | ValueError):
            raise StepError(node.label, None, type(exc).__name__, f"{exc}\n  in query: {node.query}") from exc
        return None  # e.g. a function that needs real data; the tasks will report it
    finally:
        con.close()
