"""Plan rewrites, applied to a copy of the user's plan:

1. **fuse consecutive SQL**: a single-input SQL step whose input is another SQL step used nowhere else becomes one
   query (the inner one as a subquery), so a chain of filter/map runs as one DuckDB pass per partition. An inner
   query with ORDER BY is not fused, so a sort stays the last thing that touches its output.
2. **prune unused columns**: a repartition writes only the columns that later steps reference (found from the
   input schema and the SQL text; a ``*`` or a Python step keeps all columns).
"""

from __future__ import annotations

import re

from seekstack.dataframe.execution import duck
from seekstack.dataframe.logical.nodes import Node, RepartitionNode, SqlNode, walk
from seekstack.dataframe.logical.schema import infer_schemas


def optimize(root: Node, *, fuse: bool = True, prune: bool = True) -> Node:
    """Return an optimized copy of the plan under `root` (the input plan is not modified)."""
    root = _clone(root)
    if fuse:
        root = _fuse_sql(root)
    if prune:
        _prune_columns(root)
    return root


def _clone(root: Node) -> Node:
    copies: dict[int, Node] = {}
    for node in walk(root):
        copies[node.id] = node.copy_with([copies[i.id] for i in node.inputs])
    return copies[root.id]


def _consumers(root: Node) -> dict[int, int]:
    count: dict[int, int] = {}
    for node in walk(root):
        for inp in node.inputs:
            count[inp.id] = count.get(inp.id, 0) + 1
    return count


_ORDER_BY = re.compile(r"\border\s+by\b", re.I)


def _fuse_sql(root: Node) -> Node:
    uses = _consumers(root)
    fused: dict[int, Node] = {}
    for node in walk(root):
        inputs = [fused[i.id] for i in node.inputs]
        node.inputs = inputs
        if (
            isinstance(node, SqlNode)
            and len(inputs) == 1
            and isinstance(inputs[0], SqlNode)
            and uses.get(inputs[0].id, 0) <= 1
            and not _ORDER_BY.search(inputs[0].query)
        ):
            inner = inputs[0]
            query = duck.PLACEHOLDER.sub(
                lambda m, q=inner.query: f"({q})" if m.group(1) == "0" else m.group(0), node.query
            )
            new = SqlNode(node.name, inner.inputs, query, fused=(*(inner.fused or (inner.label,)), node.label))
            new.id = node.id  # keeps its label, so errors and explain name the outermost step
            node = new
        fused[node.id] = node
    return fused[root.id]


_COUNT_STAR = re.compile(r"count\s*\(\s*\*\s*\)", re.I)


def referenced_columns(query: str, columns: list[str]) -> set[str] | None:
    """Columns of `columns` that `query` may read; None when it may read all (a ``*`` remains)."""
    text = _COUNT_STAR.sub("count()", query)
    if "*" in text:
        return None
    return {c for c in columns if re.search(rf"(?<![\w]){re.escape(c)}(?![\w])", text, re.I)}


def _prune_columns(root: Node) -> None:
    order = walk(root)
    schemas = infer_schemas(order)
    # needed[id] = columns of node `id`'s output that its consumers read; None means all of them.
    needed: dict[int, set[str] | None] = {root.id: None}
    for node in reversed(order):
        want = needed.get(node.id, set())
        for inp in node.inputs:
            schema = schemas.get(inp.id)
            if isinstance(node, SqlNode) and schema is not None:
                cols = referenced_columns(node.query, schema.names)
            elif isinstance(node, RepartitionNode) and want is not None:
                cols = set(want) | set(node.keys)
            else:
                cols = None
            prev = needed.get(inp.id, set())
            needed[inp.id] = None if cols is None or prev is None else prev | cols
        if isinstance(node, RepartitionNode) and want is not None:
            schema = schemas.get(node.inputs[0].id)
            if schema is not None:
                # The partition key is read from the input to route rows, but written only if a later step reads it.
                keep = [c for c in schema.names if c in want] or [c for c in schema.names if c in node.keys]
                if 0 < len(keep) < len(schema.names):
                    node.columns = keep
