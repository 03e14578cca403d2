"""Expert placement: which physical expert slots each EP rank holds, and EPLB-style rebalancing.

A placement is ``phys_to_log`` (P,): physical slot p lives on EP rank p // slots_per_rank at local
index p % slots_per_rank and holds logical expert phys_to_log[p]. Without redundancy P = E and the
map is the identity (rank r holds experts r·E/ep … (r+1)·E/ep − 1, contiguous, so that with
n_group = nodes one expert group is one node: node-limited routing, report §2.1.2).

``eplb_placement`` is the hierarchical policy of DeepSeek's EPLB (report §3.4.1, redundant experts), written from its
description: (1) pack expert groups onto nodes, each node taking the same number of groups, heaviest
group first onto the lightest node; (2) inside each node, give redundant slots one at a time to the
expert with the largest load per replica; (3) pack the node's replicas onto its GPUs the same way as (1).
When nodes do not divide the groups it uses one node and one group (the global policy).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dsv3.errors import UserError


@dataclass(frozen=True)
class Placement:
    phys_to_log: tuple[int, ...]
    n_logical: int
    ep: int

    def __post_init__(self):
        P = len(self.phys_to_log)
        if P % self.ep:
            raise UserError(f"{P} physical experts do not split evenly over ep={self.ep} ranks")
        missing = set(range(self.n_logical)) - set(self.phys_to_log)
        if missing:
            raise UserError(f"placement leaves logical experts {sorted(missing)[:8]} without a replica")

    @classmethod
    def contiguous(cls, n_experts: int, ep: int) -> "Placement":
        if n_experts % ep:
            raise UserError(f"model.moe.n_routed_experts={n_experts} is not divisible by parallel.ep={ep}")
        return cls(tuple(range(n_experts)), n_experts, ep)

    @property
    def n_physical(self) -> int:
        return len(self.phys_to_log)

    @property
    def slots_per_rank(self) -> int:
        return self.n_physical // self.ep

    def local_experts(self, ep_rank: int) -> list[int]:
        """Logical ids held by ``ep_rank``, in local-slot order."""
        s = self.slots_per_rank
        return list(self.phys_to_log[ep_rank * s:(ep_rank + 1) * s])

    def replicas(self) -> list[list[int]]:
        """For every logical expert, its physical slots in ascending order."""
        out: list[list[int]] = [[] for _ in range(self.n_logical)]
        for p, e in enumerate(self.phys_to_log):
            out[e].append(p)
        return out

    def log_to_phys_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, R) physical slots per logical expert padded with -1, and (E,) replica counts."""
        reps = self.replicas()
        R = max(len(r) for r in reps)
        table = torch.full((self.n_logical, R), -1, dtype=torch.long)
        for e, r in enumerate(reps):
            table[e, :len(r)] = torch.tensor(r)
        return table, torch.tensor([len(r) for r in reps])

    def to_physical(self, topk_idx: torch.Tensor) -> torch.Tensor:
        """Logical choices (N, k) → physical slots (N, k). A token picks replica t mod count, which
        spreads a hot expert's tokens evenly over its replicas and is a pure function of the row."""
        if self.n_physical == self.n_logical and self.phys_to_log == tuple(range(self.n_logical)):
            return topk_idx
        table, count = self.log_to_phys_table()
        table, count = table.to(topk_idx.device), count.to(topk_idx.device)
        tok = torch.arange(topk_idx.shape[0], device=topk_idx.device).unsqueeze(1)
        return table[topk_idx, tok % count[topk_idx]]


# ------------------------------------------------------------------------------------------ EPLB
def balanced_packing(weights: list[float], n_packs: int) -> tuple[list[int], list[int]]:
    """Put n items into n_packs packs of exactly n / n_packs items each, heaviest item first into the
    lightest pack that still has room (ties: the lower pack). Returns (pack, position in pack) per item."""
    n = len(weights)
    if n % n_packs:
        raise UserError(f"{n} items cannot be packed evenly into {n_packs} packs")
    per = n // n_packs
    pack, pos = [0] * n, [0] * n
    if per == 1:
        return list(range(n)), [0] * n
    load, items = [0.0] * n_packs, [0] * n_packs
    order = sorted(range(n), key=lambda i: -weights[i])  # stable: equal weights keep index order
    for i in order:
        p = min((q for q in range(n_packs) if items[q] < per), key=lambda q: load[q])
        pack[i], pos[i] = p, items[p]
        load[p] += weights[i]
        items[p] += 1
    return pack, pos


def replicate(weights: list[float], n_slots: int) -> tuple[list[int], list[int], list[int]]:
    """Slots n..n_slots−1 each go to the expert with the largest load per replica (ties: lower id).
    Returns (slot → expert, slot → replica rank, replica count per expert)."""
    n = len(weights)
    slot_expert, slot_rank, count = list(range(n)), [0] * n, [1] * n
    for _ in range(n, n_slots):
        e = max(range(n), key=lambda i: (weights[i] / count[i], -i))
        slot_expert.append(e)
        slot_rank.append(count[e])
        count[e] += 1
    return slot_expert, slot_rank, count


def eplb_layer(load: list[float], n_physical: int, n_groups: int, n_nodes: int, n_gpus: int) -> list[int]:
    """Hierarchical EPLB for one layer: physical slot (GPU-major) → logical expert."""
    E = len(load)
    if n_groups % n_nodes:
        n_groups, n_nodes = 1, 1  # the global policy
    if E % n_groups or n_gpus % n_nodes or n_physical % n_gpus or n_physical < E:
        raise UserError(f"EPLB needs groups | experts, nodes | GPUs, GPUs | physical experts ≥ experts "
                        f"(got {E} experts, {n_groups} groups, {n_nodes} nodes, {n_gpus} GPUs, {n_physical} slots)")
    gsize, gpn = E // n_groups, n_groups // n_nodes
    # 1. groups → nodes; node-major order of the logical experts ("node-local" ids)
    group_load = [sum(load[g * gsize:(g + 1) * gsize]) for g in range(n_groups)]
    gnode, gpos = balanced_packing(group_load, n_nodes)
    node_experts: list[list[int]] = [[0] * (gpn * gsize) for _ in range(n_nodes)]
    for g in range(n_groups):
        for j in range(gsize):
            node_experts[gnode[g]][gpos[g] * gsize + j] = g * gsize + j
    slots_per_node, gpus_per_node = n_physical // n_nodes, n_gpus // n_nodes
    per_gpu = n_physical // n_gpus
    phys: list[int] = []
    for experts in node_experts:
        w = [load[e] for e in experts]
        # 2. replicas inside the node
        slot_expert, _, count = replicate(w, slots_per_node)
        # 3. replicas → GPUs of the node
        slot_load = [w[e] / count[e] for e in slot_expert]
        gpu, pos = balanced_packing(slot_load, gpus_per_node)
        node_phys = [0] * slots_per_node
        for s, e in enumerate(slot_expert):
            node_phys[gpu[s] * per_gpu + pos[s]] = experts[e]
        phys += node_phys
    return phys


def eplb_placement(load: torch.Tensor, n_physical: int, n_groups: int, n_nodes: int, n_gpus: int) -> torch.Tensor:
    """load (layers, E) measured tokens per expert → phys_to_log (layers, n_physical)."""
    load = load.reshape(-1, load.shape[-1]).double()
    rows = [eplb_layer(l.tolist(), n_physical, n_groups, n_nodes, n_gpus) for l in load]
    return torch.tensor(rows, dtype=torch.long)


def placement_from_load(load: torch.Tensor, n_physical: int, n_groups: int, n_nodes: int, ep: int) -> Placement:
    """One layer's Placement from its measured loads (E,)."""
    phys = eplb_layer(load.double().tolist(), n_physical, n_groups, n_nodes, ep)
    return Placement(tuple(phys), load.numel(), ep)


def max_gpu_load(placement: Placement, load: torch.Tensor) -> float:
    """Largest per-GPU load when each expert's load splits evenly over its replicas."""
    _, count = placement.log_to_phys_table()
    per_slot = load.double()[list(placement.phys_to_log)] / count.double()[list(placement.phys_to_log)]
    return float(per_slot.view(placement.ep, -1).sum(1).max())
