"""Training strategies that run on many ranks. Each exposes `worker(comm, job) -> dict`."""
