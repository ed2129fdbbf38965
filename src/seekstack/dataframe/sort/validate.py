"""Validation of a sort result, like gensort's valsort: global key order over the partitions in order, the record
count and an order-independent checksum that must equal the input's.

>>> from seekstack.dataframe.sort.gensort import generate, checksum
>>> rec = generate(0, 50)
>>> s = validate_records([rec[np.lexsort(rec[:, :10].T[::-1])]])
>>> (s.records, s.ordered, s.checksum == checksum(rec))
(50, True, True)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from seekstack.dataframe import io
from seekstack.dataframe.sort.gensort import KEY_BYTES, checksum, records_of


@dataclass
class SortSummary:
    records: int
    checksum: int
    ordered: bool
    first_unordered: int | None = None  # global index of the first record smaller than its predecessor


def _split_key(rec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keys = np.ascontiguousarray(rec[:, :KEY_BYTES])
    hi = keys[:, :8].copy().view(">u8").ravel()
    lo = keys[:, 8:].copy().view(">u2").ravel()
    return hi, lo


def validate_records(chunks) -> SortSummary:
    """`chunks`: arrays of records in output order (an iterable, so big outputs stream)."""
    total, csum, ordered, first_bad = 0, 0, True, None
    prev = None
    for rec in chunks:
        if len(rec) == 0:
            continue
        hi, lo = _split_key(rec)
        if prev is not None:
            hi, lo = np.concatenate([[prev[0]], hi]), np.concatenate([[prev[1]], lo])
        ok = (hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] >= lo[:-1]))
        if ordered and not ok.all():
            ordered = False
            first_bad = total + int(np.argmin(ok)) + (0 if prev is not None else 1)
        prev = (hi[-1], lo[-1])
        total += len(rec)
        csum = (csum + checksum(rec)) % (1 << 64)
    return SortSummary(total, csum, ordered, first_bad)


def validate_partitions(partitions: list[list[str]]) -> SortSummary:
    """Validate sorted parquet output: partition files in order, each with a ``record`` column."""

    def chunks():
        for files in partitions:
            for f in files:
                yield records_of(io.read_parquet_table([f], columns=["record"])["record"])

    return validate_records(chunks())
