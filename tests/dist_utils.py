"""Multi-process test helper: see parallel.launch_utils.run_ranks."""
from parallel.launch_utils import free_port, run_ranks  # noqa: F401
