"""Runs an optimized plan step by step on an executor, with retries and checkpoint reuse.

Each step's tasks are submitted together; failed attempts are resubmitted (up to `max_retries` retries for
retryable failures) and a step fails as a whole with a `StepError` naming it. Finished tasks are found by their
manifests and never rerun.
"""

from __future__ import annotations

import logging

from seekstack.dataframe import serialize
from seekstack.dataframe.errors import StepError
from seekstack.dataframe.execution.runner import load_checkpoint
from seekstack.dataframe.logical.nodes import Node, walk
from seekstack.dataframe.logical.planner import Partitions, plan_node

log = logging.getLogger("seekstack.dataframe")


class Driver:
    def __init__(self, executor, tasks_dir: str, max_retries: int):
        self.executor = executor
        self.tasks_dir = tasks_dir
        self.max_retries = max_retries
        self.stats = {"tasks_run": 0, "tasks_skipped": 0, "attempts_failed": 0}

    def compute(self, root: Node) -> Partitions:
        done: dict[int, Partitions] = {}
        for node in walk(root):
            tasks, assemble = plan_node(node, [done[i.id] for i in node.inputs], self.tasks_dir)
            done[node.id] = assemble(self.run_tasks(tasks))
        return done[root.id]

    def run_tasks(self, tasks) -> list[Partitions]:
        results: list[Partitions | None] = [None] * len(tasks)
        pending: dict[int, int] = {}  # task index -> attempt number
        for i, task in enumerate(tasks):
            outputs = load_checkpoint(task)
            if outputs is None:
                pending[i] = 0
            else:
                results[i] = outputs
                self.stats["tasks_skipped"] += 1
        blobs = {i: serialize.dumps(tasks[i]) for i in pending}
        while pending:
            order = sorted(pending)
            outcomes = self.executor.run_many([(blobs[i], pending[i]) for i in order])
            for i, outcome in zip(order, outcomes, strict=True):
                if outcome[0] == "ok":
                    results[i] = outcome[1]
                    self.stats["tasks_run"] += 1
                    del pending[i]
                    continue
                _, type_name, message, retryable, tb = outcome
                self.stats["attempts_failed"] += 1
                task = tasks[i]
                if retryable and pending[i] < self.max_retries:
                    log.info(
                        "%s partition %d attempt %d failed (%s: %s); retrying",
                        task.step,
                        task.index,
                        pending[i],
                        type_name,
                        message,
                    )
                    pending[i] += 1
                    continue
                raise StepError(task.step, task.index, type_name, message, tb)
        return results  # type: ignore[return-value]
