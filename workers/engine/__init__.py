"""The execution engine: DAG building and scheduling (pure) and the runner (I/O)."""
