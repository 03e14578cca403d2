"""EPLB-style placement: the published example of deepseek-ai/EPLB's README, and the properties of the
hierarchical policy (groups stay on one node, replicas lower the hottest GPU's load)."""
from __future__ import annotations

import pytest
import torch

from dsv3.errors import UserError
from parallel.placement import (Placement, balanced_packing, eplb_placement, max_gpu_load,
                                placement_from_load, replicate)

# deepseek-ai/EPLB README: 2 layers × 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs
README_WEIGHT = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                              [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_eplb_readme_example():
    assert eplb_placement(README_WEIGHT, 16, 4, 2, 8).tolist() == README_PHY2LOG


def test_groups_stay_on_one_node_and_load_drops():
    g = torch.Generator().manual_seed(0)
    load = (torch.rand(64, generator=g) ** 4 * 1000).round()     # skewed
    pl = placement_from_load(load, n_physical=80, n_groups=8, n_nodes=4, ep=16)
    per_node = len(pl.phys_to_log) // 4
    for n in range(4):
        groups = {e // 8 for e in pl.phys_to_log[n * per_node:(n + 1) * per_node]}
        assert len(groups) == 2                                 # 8 groups / 4 nodes, whole groups
    base = max_gpu_load(Placement.contiguous(64, 16), load)
    assert max_gpu_load(pl, load) < 0.75 * base
    assert sorted(set(pl.phys_to_log)) == list(range(64))


def test_balanced_packing_and_replicate():
    pack, pos = balanced_packing([5.0, 1.0, 4.0, 2.0], 2)
    # heaviest first into the lightest pack with room: 5→0, 4→1, 2→1 (now full), 1→0: loads 6 / 6
    assert pack == [0, 0, 1, 1] and pos == [0, 1, 0, 1]
    slot_expert, rank, count = replicate([10.0, 1.0, 4.0], 6)
    assert slot_expert == [0, 1, 2, 0, 0, 2] and count == [3, 1, 2] and rank[3:] == [1, 2, 1]


def test_global_policy_when_nodes_do_not_divide_groups():
    load = torch.tensor([[8.0, 1, 1, 1, 1, 1]])
    phys = eplb_placement(load, 8, 3, 2, 4)[0].tolist()        # 3 groups, 2 nodes → global
    assert sorted(phys) == [0, 0, 0, 1, 2, 3, 4, 5]


def test_placement_errors():
    with pytest.raises(UserError, match="without a replica"):
        Placement((0, 1, 1, 3), 4, 2)
    with pytest.raises(UserError, match="divisible"):
        Placement.contiguous(10, 4)
