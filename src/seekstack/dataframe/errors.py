"""Exceptions of the dataframe layer: every failure names the step (plan node) and the partition it happened in.

>>> err = StepError("filter#2", 3, "BinderException", 'column "x" not found')
>>> str(err)
'step filter#2, partition 3: BinderException: column "x" not found'
"""

from __future__ import annotations


class StepError(RuntimeError):
    """A task of a plan step failed for good (after its retries).

    Attributes: `step` (the node's label, e.g. ``partial_sql#4``), `partition` (output partition index or None),
    `cause_type` (the original exception's class name) and `cause` (its message).
    """

    def __init__(self, step: str, partition: int | None, cause_type: str, cause: str, details: str = ""):
        self.step, self.partition = step, partition
        self.cause_type, self.cause, self.details = cause_type, cause, details
        where = f"step {step}" + (f", partition {partition}" if partition is not None else "")
        super().__init__(f"{where}: {cause_type}: {cause}")


class SchemaMismatchError(ValueError):
    """The files of one partition (or the partitions being merged) do not share one schema."""


class InjectedFault(RuntimeError):
    """Raised on purpose by the fault-injection knob (`fault_inject_prob`), so retries can be tested."""
