"""Turns one plan node, once its inputs' partitions are known (as file lists), into tasks, and the tasks'
outputs into the node's partitions. Task keys hash the node's parameters and the exact input files, so a rerun of
the same job finds the same task directories and their checkpoints.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from seekstack.dataframe import io
from seekstack.dataframe.execution import duck
from seekstack.dataframe.execution.tasks import PartitionTask, PythonTask, SqlTask, Task
from seekstack.dataframe.logical.nodes import Node, PythonNode, RepartitionNode, SourceNode, SqlNode

Partitions = list[list[str]]
Assemble = Callable[[list[Partitions]], Partitions]


def plan_node(node: Node, inputs: list[Partitions], tasks_dir: str) -> tuple[list[Task], Assemble]:
    """Tasks for `node` and a function mapping their outputs (in task order) to the node's partitions."""
    if isinstance(node, SourceNode):
        return _plan_source(node, tasks_dir)
    if isinstance(node, SqlNode):
        return _per_partition(node, inputs, tasks_dir, lambda common: SqlTask(**common, query=node.query))
    if isinstance(node, PythonNode):
        return _per_partition(
            node,
            inputs,
            tasks_dir,
            lambda common: PythonTask(
                **common, fn=node.fn, mode=node.mode, batch_size=node.batch_size, schema=node.schema
            ),
        )
    if isinstance(node, RepartitionNode):
        return _plan_repartition(node, inputs[0], tasks_dir)
    raise TypeError(f"no planner for node {node.label}")


def _common(node: Node, index: int, inputs: Partitions, tasks_dir: str) -> dict:
    text = "\n".join([node.signature(), str(index), *("|".join(files) for files in inputs)])
    key = hashlib.sha1(text.encode()).hexdigest()[:20]
    return {
        "step": node.label,
        "index": index,
        "key": key,
        "out_dir": io.join(tasks_dir, f"{node.name}-{key}"),
        "inputs": inputs,
    }


def _flatten(results: list[Partitions]) -> Partitions:
    return [part for result in results for part in result]


def _per_partition(node: Node, inputs: list[Partitions], tasks_dir: str, make) -> tuple[list[Task], Assemble]:
    counts = {len(p) for p in inputs}
    if len(counts) != 1:
        raise ValueError(f"{node.label}: inputs must have the same number of partitions, got {sorted(counts)}")
    n = counts.pop()
    tasks = [make(_common(node, i, [inp[i] for inp in inputs], tasks_dir)) for i in range(n)]
    return tasks, _flatten


def _plan_source(node: SourceNode, tasks_dir: str) -> tuple[list[Task], Assemble]:
    if node.fmt == "parquet":
        if node.options.get("union_by_name") or node.options.get("columns"):
            cols = node.options.get("columns")
            select = "*" if not cols else ", ".join(duck.quote(c) for c in cols)
            ubn = ", union_by_name=true" if node.options.get("union_by_name") else ""
            query = f"SELECT {select} FROM read_parquet({duck.sql_list(node.files)}{ubn})"
            return [SqlTask(**_common(node, 0, [], tasks_dir), query=query, source_files=list(node.files))], _flatten
        return [], lambda _: [list(node.files)]
    reader = {"csv": "read_csv", "json": "read_json"}[node.fmt]
    opts = "".join(f", {k}={_sql_value(v)}" for k, v in node.options.items())
    query = f"SELECT * FROM {reader}({duck.sql_list(node.files)}{opts})"
    return [SqlTask(**_common(node, 0, [], tasks_dir), query=query, source_files=list(node.files))], _flatten


def _sql_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, dict):  # column types for csv/json
        return "{" + ", ".join(f"'{k}': '{t}'" for k, t in v.items()) + "}"
    return "'" + str(v).replace("'", "''") + "'"


def _plan_repartition(node: RepartitionNode, parts: Partitions, tasks_dir: str) -> tuple[list[Task], Assemble]:
    n = node.npartitions
    mode = node.mode
    files = [f for p in parts for f in p]
    if mode == "files" and node.columns is None and len(files) >= n:
        groups = [files[len(files) * j // n : len(files) * (j + 1) // n] for j in range(n)]
        return [], lambda _: groups
    if mode == "files":
        mode = "rows"
    tasks: list[Task] = []
    offset = 0
    for i, p in enumerate(parts):
        common = _common(node, i, [p], tasks_dir)
        tasks.append(
            PartitionTask(**common, npartitions=n, mode=mode, keys=node.keys, columns=node.columns, offset=offset)
        )
        offset += 1  # round-robin start shifts per producer so small partitions do not all fill bucket 0

    def assemble(results: list[Partitions]) -> Partitions:
        return [[f for result in results for f in result[j]] for j in range(n)]

    return tasks, assemble
