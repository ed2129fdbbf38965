"""GraySort at a small size: generator layout, validator, and the shuffle + sort pipeline vs a numpy sort."""

from __future__ import annotations

import numpy as np
import pytest

from seekstack.dataframe.bench_sort import parse_size
from seekstack.dataframe.sort import bucket_of, checksum, generate
from seekstack.dataframe.sort.gensort import records_of
from seekstack.dataframe.sort.pipeline import generate_input, sort_records
from seekstack.dataframe.sort.validate import validate_partitions, validate_records


def test_generator_layout_and_ranges():
    rec = generate(1000, 257, seed=3)
    assert rec.shape == (257, 100)
    assert bytes(rec[0, 12:44]) == b"%032X" % 1000 and bytes(rec[-1, 12:44]) == b"%032X" % 1256
    assert (rec[:, 10:12] == [0, 0x11]).all() and (rec[:, 96:] == [0xCC, 0xDD, 0xEE, 0xFF]).all()
    # any range is reproducible on its own, and different seeds differ
    np.testing.assert_array_equal(generate(1000, 257, seed=3), rec)
    assert not np.array_equal(generate(1000, 257, seed=4)[:, :10], rec[:, :10])
    b = bucket_of(rec[:, :10], 8)
    np.testing.assert_array_equal(b, rec[:, 0] >> 5)
    with pytest.raises(ValueError, match="num_buckets"):
        bucket_of(rec[:, :10], 6)


def test_validator_detects_disorder_loss_and_corruption():
    rec = generate(0, 300)
    good = rec[np.lexsort(rec[:, :10].T[::-1])]
    s = validate_records([good[:100], good[100:]])
    assert s.ordered and s.records == 300 and s.checksum == checksum(rec)
    bad = good.copy()
    bad[[10, 11]] = bad[[11, 10]]
    assert validate_records([bad]).first_unordered == 11
    assert not validate_records([good[150:], good[:150]]).ordered  # partitions in the wrong order
    assert validate_records([good[1:]]).checksum != checksum(rec)
    flipped = good.copy()
    flipped[5, 60] ^= 1
    assert validate_records([flipped]).checksum != checksum(rec)


def test_graysort_small(session):
    records = 20_011
    data = generate_input(session, records, 3, 4, seed=11)
    out = sort_records(data, 4)
    assert out.num_partitions == 4
    summary = validate_partitions(out._partitions())
    ref = generate(0, records, seed=11)
    assert summary.ordered and summary.records == records and summary.checksum == checksum(ref)
    table = out.to_arrow()
    got = records_of(table["record"])
    np.testing.assert_array_equal(got[:, :10], ref[np.lexsort(ref[:, :10].T[::-1])][:, :10])


def test_parse_size():
    assert parse_size("1GB") == 10**9 and parse_size("64MiB") == 64 << 20 and parse_size("512 kb") == 512_000
    with pytest.raises(ValueError, match="size"):
        parse_size("lots")
