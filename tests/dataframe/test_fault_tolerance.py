"""Retries (with the fault-injection knob), workers killed mid-task, and resuming a job from its checkpoints."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pytest

import seekstack.dataframe as sp
from seekstack.dataframe import StepError
from seekstack.dataframe.execution.runner import MANIFEST

from .conftest import random_frame

QUERY = "SELECT g, count(*) AS c, sum(w) AS s FROM {0} GROUP BY g"


def expected(pdf: pd.DataFrame) -> list[tuple]:
    return sorted(duckdb.sql(QUERY.format("pdf")).fetchall())


def result(session, pdf, n=3) -> list[tuple]:
    df = session.from_pandas(pdf).repartition(n, hash_by="g")
    return sorted(tuple(r.values()) for r in session.partial_sql(QUERY, df).take_all())


def no_uncommitted_outputs_visible(session) -> None:
    for task_dir in Path(session.tasks_dir).iterdir():
        if (task_dir / MANIFEST).exists():
            assert not [p for p in task_dir.iterdir() if p.name.startswith(".tmp")], task_dir


def test_injected_faults_are_retried(tmp_path, rng):
    pdf = random_frame(rng, 900)
    # 1.0: every attempt but the last fails, so faults happen on every run (below 1 the draws hash the job id)
    with sp.init(data_root=str(tmp_path), num_executors=2, fault_inject_prob=1.0, max_retries=2) as s:
        assert result(s, pdf) == expected(pdf)
        assert s.last_stats["attempts_failed"] > 0
        no_uncommitted_outputs_visible(s)


def test_killed_workers_leave_no_corrupt_output(tmp_path, rng):
    pdf = random_frame(rng, 500)
    with sp.init(
        data_root=str(tmp_path),
        num_executors=2,
        fault_inject_prob=0.5,
        fault_inject_kill=True,
        max_retries=2,
        seed=rng.integers(1 << 30),
    ) as s:
        assert result(s, pdf, n=2) == expected(pdf)
        no_uncommitted_outputs_visible(s)


def test_last_attempt_never_injected_and_flaky_function_retried(inline, tmp_path):
    inline.fault_inject_prob, inline.max_retries = 0.99, 0
    assert inline.from_items([{"a": 1}]).filter("a > 0").count() == 1  # the last attempt never gets a fault
    inline.max_retries = 1
    inline.fault_inject_prob = 0.0

    flag = tmp_path / "failed-once"

    def flaky(row):
        if not flag.exists():  # state lives in a file: each attempt unpickles a fresh copy of the function
            flag.write_text("")
            raise ConnectionError("transient")
        return row

    assert inline.from_items([{"a": 2}]).map(flaky).take_all() == [{"a": 2}]


def test_rerun_skips_finished_tasks(tmp_path, rng):
    pdf = random_frame(rng, 400).assign(part=lambda d: d.k % 4)
    markers, poison = tmp_path / "markers", tmp_path / "poison"
    markers.mkdir()
    poison.write_text("1")

    def tag(table: pa.Table) -> pa.Table:
        (markers / uuid.uuid4().hex).write_text("")
        if poison.exists() and 2 in table["part"].to_pylist():
            raise RuntimeError("poisoned partition")
        return table.append_column("tagged", pa.array([True] * table.num_rows))

    def pipeline(s):
        return s.from_pandas(pdf).repartition(4, by="part").map_batches(tag)

    root = str(tmp_path / "root")
    with sp.init(data_root=root, job_id="resume-me", num_executors=0, max_retries=0) as s:
        with pytest.raises(StepError, match=r"map_batches#\d+, partition 2: RuntimeError: poisoned"):
            pipeline(s).count()
    first = len(os.listdir(markers))
    assert first == 4  # every partition ran once; three committed
    poison.unlink()
    with sp.init(data_root=root, job_id="resume-me", num_executors=0, max_retries=0) as s:
        out = pipeline(s).to_pandas()
        assert s.last_stats["tasks_run"] == 1 and s.last_stats["tasks_skipped"] == 4  # 1 shuffle + 3 map tasks
    assert len(os.listdir(markers)) == first + 1
    assert len(out) == len(pdf) and out["tagged"].all()
