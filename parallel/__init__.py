"""Parallelism: mesh, expert-parallel all-to-all, pipeline schedules, parallelize()."""
