"""GraySort pieces: a gensort-layout record generator and a validator (order, count, checksum)."""

from seekstack.dataframe.sort.gensort import KEY_BYTES, RECORD_BYTES, bucket_of, checksum, generate, to_arrow
from seekstack.dataframe.sort.validate import SortSummary, validate_partitions

__all__ = [
    "KEY_BYTES",
    "RECORD_BYTES",
    "SortSummary",
    "bucket_of",
    "checksum",
    "generate",
    "to_arrow",
    "validate_partitions",
]
