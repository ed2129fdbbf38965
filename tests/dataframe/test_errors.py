"""Bad input fails with an exception that names the step (or the argument) and the cause."""

from __future__ import annotations

import pandas as pd
import pytest

import seekstack.dataframe as sp
from seekstack.dataframe import SchemaMismatchError, StepError


def test_sql_errors_name_the_step(inline):
    df = inline.from_items([{"a": 1}])
    with pytest.raises(StepError, match=r"filter#\d+.*nope") as e:
        df.filter("nope > 1").count()
    assert e.value.cause_type == "BinderException"
    with pytest.raises(StepError, match=r"partial_sql#\d+.*(Parser|syntax)"):
        inline.partial_sql("SELEC a FROM {0}", df).count()


def test_missing_column_in_repartition_names_step(inline):
    df = inline.from_items([{"a": 1}, {"a": 2}])
    with pytest.raises(StepError, match=r"repartition#\d+, partition 0: BinderException.*missing"):
        df.repartition(2, hash_by="missing").count()
    with pytest.raises(StepError, match="partition ids in"):
        df.repartition(2, by="a").count()  # a=2 is not a valid partition id for 2 partitions


def test_python_function_error_names_step(inline):
    df = inline.from_items([{"a": 1}])
    inline.max_retries = 1

    def boom(row):
        raise KeyError("no_such_field")

    with pytest.raises(StepError, match=r"map#\d+, partition 0: KeyError: 'no_such_field'"):
        df.map(boom).count()


def test_schema_differs_between_partitions(inline, tmp_path):
    pd.DataFrame({"a": [1, 2]}).to_parquet(tmp_path / "p1.parquet")
    pd.DataFrame({"a": ["x"], "b": [1.0]}).to_parquet(tmp_path / "p2.parquet")
    df = inline.read_parquet(str(tmp_path / "p*.parquet"))
    with pytest.raises(StepError, match=r"SchemaMismatchError.*schemas differ"):
        df.filter("true").count()
    with pytest.raises(SchemaMismatchError):
        df.to_arrow()
    both = inline.read_parquet(str(tmp_path / "p*.parquet"), union_by_name=True)
    assert both.count() == 3


def test_missing_paths_and_bad_arguments(inline, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        inline.read_parquet(str(tmp_path / "nothing-here" / "*.parquet"))
    df = inline.from_items([{"a": 1}])
    with pytest.raises(ValueError, match="hash_by and by"):
        df.repartition(2, hash_by="a", by="a")
    with pytest.raises(ValueError, match="same number of partitions"):
        inline.partial_sql("SELECT * FROM {0}, {1}", df, df.repartition(2))
    with pytest.raises(ValueError, match=r"uses \{1\}"):
        inline.partial_sql("SELECT * FROM {1}", df)
    with pytest.raises(ValueError, match="batch_size"):
        df.map_batches(lambda t: t, batch_size=0)
    with pytest.raises(ValueError, match="num_executors"):
        sp.init(data_root=str(tmp_path), num_executors=-1)


def test_settings_argument_over_env_over_default(tmp_path, monkeypatch):
    monkeypatch.setenv("SP_DATA_ROOT", str(tmp_path / "env"))
    monkeypatch.setenv("SP_NUM_EXECUTORS", "0")
    monkeypatch.setenv("SP_MAX_RETRIES", "2")
    monkeypatch.setenv("SP_JOBID", "job-from-env")
    s = sp.init(max_retries=4)
    assert (s.data_root, s.num_executors, s.max_retries, s.job_id) == (str(tmp_path / "env"), 0, 4, "job-from-env")
    assert s.fault_inject_prob == 0.0 and s.task_threads == 1
    monkeypatch.setenv("SP_NUM_EXECUTORS", "two")
    with pytest.raises(ValueError, match="SP_NUM_EXECUTORS"):
        sp.init()
