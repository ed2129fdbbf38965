"""GraySort on the dataframe layer: generate ranges of records, shuffle them by key-prefix bucket, sort each
partition. Partition p holds only keys of bucket p, so the partitions in order form one sorted sequence.

>>> import tempfile, seekstack.dataframe as sp
>>> s = sp.init(data_root=tempfile.mkdtemp(), num_executors=0)
>>> data = generate_input(s, 1000, 2, 4)
>>> out = sort_records(data, 4)
>>> summary = validate_partitions(out._partitions())
>>> summary.records, summary.ordered
(1000, True)
>>> s.shutdown()
"""

from __future__ import annotations

from functools import partial

import pyarrow as pa

from seekstack.dataframe.dataframe import DataFrame
from seekstack.dataframe.sort.gensort import generate, to_arrow
from seekstack.dataframe.sort.validate import validate_partitions

__all__ = ["generate_input", "sort_records", "validate_partitions"]


def _generate_batch(table: pa.Table, num_buckets: int, seed: int) -> pa.Table:
    tables = [
        to_arrow(generate(b, c, seed), num_buckets)
        for b, c in zip(table["begin"].to_pylist(), table["count"].to_pylist(), strict=True)
    ]
    return pa.concat_tables(tables)


def generate_input(
    session,
    total_records: int,
    num_data_partitions: int,
    num_sort_partitions: int,
    seed: int = 0,
    ranges_per_partition: int = 4,
) -> DataFrame:
    """A DataFrame of `total_records` records (columns bucket, key, record) in `num_data_partitions` partitions."""
    if total_records < 1 or num_data_partitions < 1:
        raise ValueError("total_records and num_data_partitions must be >= 1")
    nranges = max(1, min(total_records, num_data_partitions * ranges_per_partition))
    bounds = [total_records * i // nranges for i in range(nranges + 1)]
    items = [{"begin": bounds[i], "count": bounds[i + 1] - bounds[i]} for i in range(nranges)]
    fn = partial(_generate_batch, num_buckets=num_sort_partitions, seed=seed)
    return session.from_items(items).repartition(num_data_partitions, by_rows=True).map_batches(fn, batch_size=1)


def sort_records(data: DataFrame, num_sort_partitions: int) -> DataFrame:
    """Shuffle by the ``bucket`` column into `num_sort_partitions` partitions and sort each by key."""
    shuffled = data.repartition(num_sort_partitions, by="bucket")
    return shuffled._session.partial_sql("SELECT key, record FROM {0} ORDER BY key", shuffled)
