"""Where the pipeline cuts the layers (report §3.2.1): the one rule shared by the trainer
(``parallel.dsv3_stages.dsv3_stages``) and the planner (``dsv3.tools.plan``), so both see the same stages.

    stage_bounds(61, 16) -> [0, 4, 8, ..., 52, 55, 58, 61]   # stages 0–12 take 4 layers, 13–15 take 3

Layers are split as evenly as possible, earlier stages taking the remainder; stage s holds layers
[b[s], b[s+1]). The first stage also holds the embedding (and so the first, dense layers); the last
holds the final norm, the head and the MTP modules. Pure: stdlib only, no processes.
"""
from __future__ import annotations


def stage_bounds(n_layers: int, num_stages: int) -> list[int]:
    """num_stages + 1 boundaries b with b[0] = 0, b[-1] = n_layers; stage s has n // S + (s < n % S) layers."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be at least 1, got {num_stages}")
    if num_stages > n_layers:
        raise ValueError(f"{num_stages} pipeline stages need at least as many layers; model.n_layers={n_layers}")
    base, extra = divmod(n_layers, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return bounds
