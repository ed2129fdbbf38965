"""Records in gensort's layout (our own generator): 100 bytes each, the first 10 a random key.

Layout: key[0:10] | 00 11 | row id as 32 hex digits | 88 99 AA BB | 48 filler bytes | CC DD EE FF.
Record `i` depends only on (seed, i), so any range can be generated independently and reproducibly.

>>> rec = generate(5, 3)
>>> rec.shape, bytes(rec[0, 12:44]).decode()[-2:], bytes(rec[2, 96:])
((3, 100), '05', b'\\xcc\\xdd\\xee\\xff')
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

RECORD_BYTES = 100
KEY_BYTES = 10
_HEX = np.frombuffer(b"0123456789ABCDEF", dtype=np.uint8)
# Order-independent checksum: each record's 25 little-endian uint32 words dotted with fixed odd weights, summed
# over all records modulo 2**64 (a stand-in for gensort's sum of per-record CRC32s).
_WEIGHTS = (np.arange(25, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019)) | 1


def generate(begin: int, count: int, seed: int = 0) -> np.ndarray:
    """Records ``begin .. begin+count-1`` as a ``(count, 100)`` uint8 array."""
    if begin < 0 or count < 0:
        raise ValueError(f"begin and count must be >= 0, got {begin}, {count}")
    ids = np.arange(begin, begin + count, dtype=np.uint64)
    rec = np.empty((count, RECORD_BYTES), dtype=np.uint8)
    rec[:, :8] = _splitmix64(ids * np.uint64(2) + np.uint64(seed) * np.uint64(0x100000001B3))[:, None].view(np.uint8)
    rec[:, 8:10] = _splitmix64(ids * np.uint64(2) + np.uint64(1) + np.uint64(seed) * np.uint64(0x100000001B3))[
        :, None
    ].view(np.uint8)[:, :2]
    rec[:, 10:12] = (0x00, 0x11)
    rec[:, 12:28] = ord("0")  # the high 64 bits of the 128-bit row id are zero here
    shifts = np.arange(60, -4, -4, dtype=np.uint64)
    rec[:, 28:44] = _HEX[((ids[:, None] >> shifts) & np.uint64(0xF)).astype(np.intp)]
    rec[:, 44:48] = (0x88, 0x99, 0xAA, 0xBB)
    rec[:, 48:96] = (ord("A") + ((ids[:, None] + np.arange(48, dtype=np.uint64) // 4) % 16)).astype(np.uint8)
    rec[:, 96:100] = (0xCC, 0xDD, 0xEE, 0xFF)
    return rec


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based hash: key bytes of record i depend on (seed, i) only, whatever range generates it."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def bucket_of(keys: np.ndarray, num_buckets: int) -> np.ndarray:
    """Bucket from the top bits of the first two key bytes (`num_buckets` a power of two, at most 65536)."""
    if num_buckets < 1 or num_buckets & (num_buckets - 1) or num_buckets > 1 << 16:
        raise ValueError(f"num_buckets must be a power of two in [1, 65536], got {num_buckets}")
    prefix = (keys[:, 0].astype(np.uint32) << 8) | keys[:, 1]
    return (prefix >> (16 - num_buckets.bit_length() + 1)).astype(np.uint16)


def checksum(rec: np.ndarray) -> int:
    words = np.ascontiguousarray(rec).view("<u4").astype(np.uint64)
    with np.errstate(over="ignore"):
        return int((words * _WEIGHTS).sum(axis=1, dtype=np.uint64).sum(dtype=np.uint64))


def to_arrow(rec: np.ndarray, num_buckets: int) -> pa.Table:
    """Columns ``bucket`` (uint16), ``key`` (binary 10) and ``record`` (binary 100)."""
    n = len(rec)
    keys = np.ascontiguousarray(rec[:, :KEY_BYTES])
    return pa.table(
        {
            "bucket": pa.array(bucket_of(keys, num_buckets)),
            "key": pa.FixedSizeBinaryArray.from_buffers(pa.binary(KEY_BYTES), n, [None, pa.py_buffer(keys)]),
            "record": pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(RECORD_BYTES), n, [None, pa.py_buffer(np.ascontiguousarray(rec))]
            ),
        }
    )


def records_of(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The ``record`` column back as a ``(n, 100)`` uint8 array (fixed-size or variable binary)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], pa.binary(RECORD_BYTES))
    if pa.types.is_fixed_size_binary(column.type):
        buf = np.frombuffer(column.buffers()[1], dtype=np.uint8)
        start = column.offset * RECORD_BYTES
        return buf[start : start + len(column) * RECORD_BYTES].reshape(-1, RECORD_BYTES)
    column = column.cast(pa.large_binary()) if not pa.types.is_large_binary(column.type) else column
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int64)[column.offset : column.offset + len(column) + 1]
    if len(column) and not np.all(np.diff(offsets) == RECORD_BYTES):
        raise ValueError("record: every record must be 100 bytes")
    data = np.frombuffer(column.buffers()[2], dtype=np.uint8)
    return data[offsets[0] : offsets[0] + len(column) * RECORD_BYTES].reshape(-1, RECORD_BYTES)
