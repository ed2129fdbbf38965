"""What to compute: plan nodes, the optimizer (SQL fusion, column pruning) and the planner (nodes to tasks)."""
