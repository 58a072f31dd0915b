"""Running a grid: one cell to one record under its lock, executors, shards, the cost model, the run session."""
