"""How a plan runs: tasks, the DuckDB connection each task gets, atomic commits, and the executors."""
