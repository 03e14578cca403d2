"""Routing plans: pure functions from the router's choices and the expert placement to the rows each
rank sends on each hop, in what order, and how the results come back (report §3.2.2).

A hop moves rows of a table (tokens at the source, forwarded rows at a relay) to peers of one process
group. ``plan_hop`` gives, for each destination, the rows that have at least one choice there —
one copy per (row, destination), never one per choice — sorted by destination then row, plus a mask
of which of the row's k choices that destination serves. Combine walks the hops backwards: every
receiver returns one row per row it received (its choices already summed), and the sender adds them
into the rows it sent from (``index_add`` on ``send_rows``).

Dispatchers:
- ``flat``:   one hop over the EP group; destination = rank owning the expert.
- ``two_hop``: hop 1 over ``ep_inter`` (one rank per node, same local index): destination = node of
  the expert, so a token crosses the network once per node it reaches (≤ topk_group with node-limited
  routing); hop 2 over ``ep_intra`` at the relay: destination = local rank owning the expert.
The final receiver sorts its (row, choice) pairs by local expert for the grouped GEMM (``plan_experts``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HopPlan:
    send_rows: torch.Tensor    # (S,) row of the hop's input table for each sent copy, grouped by dest
    send_dest: torch.Tensor    # (S,) destination (group rank) of each copy, non-decreasing
    send_counts: torch.Tensor  # (n_dest,) copies per destination
    choice_mask: torch.Tensor  # (S, k) bool: which of the row's choices that destination serves


def plan_hop(choice_dest: torch.Tensor, n_dest: int) -> HopPlan:
    """choice_dest (N, k): destination of every choice, -1 where the choice is not in this table
    (already served elsewhere). One copy per (row, distinct destination)."""
    N, k = choice_dest.shape
    d = torch.where(choice_dest < 0, torch.full_like(choice_dest, n_dest), choice_dest)
    hit = torch.zeros(N, n_dest + 1, dtype=torch.bool, device=choice_dest.device)
    hit.scatter_(1, d, True)
    hit = hit[:, :n_dest]
    send_dest, send_rows = hit.t().nonzero(as_tuple=True)  # row-major over (dest, row)
    return HopPlan(send_rows, send_dest, hit.sum(0), choice_dest[send_rows] == send_dest.unsqueeze(1))


@dataclass(frozen=True)
class Topology:
    """How physical expert slots map to an EP group laid out as ep_nodes × ep_local ranks."""
    ep_nodes: int
    ep_local: int
    slots_per_rank: int

    @property
    def ep(self) -> int:
        return self.ep_nodes * self.ep_local

    def rank_of(self, phys: torch.Tensor) -> torch.Tensor:
        return torch.where(phys < 0, phys, phys // self.slots_per_rank)

    def node_of(self, phys: torch.Tensor) -> torch.Tensor:
        return torch.where(phys < 0, phys, phys // (self.slots_per_rank * self.ep_local))

    def local_of(self, phys: torch.Tensor) -> torch.Tensor:
        return torch.where(phys < 0, phys, (phys // self.slots_per_rank) % self.ep_local)

    def slot_of(self, phys: torch.Tensor) -> torch.Tensor:
        return torch.where(phys < 0, phys, phys % self.slots_per_rank)


def plan_flat(phys_idx: torch.Tensor, topo: Topology) -> HopPlan:
    """phys_idx (N, k) physical slots → the single hop over the EP group."""
    return plan_hop(topo.rank_of(phys_idx), topo.ep)


def plan_inter(phys_idx: torch.Tensor, topo: Topology) -> HopPlan:
    """Two-hop, hop 1: one copy per destination node, to the rank with this rank's local index."""
    return plan_hop(topo.node_of(phys_idx), topo.ep_nodes)


def plan_intra(phys_idx: torch.Tensor, topo: Topology) -> HopPlan:
    """Two-hop, hop 2 at the relay: phys_idx (R, k) has −1 for choices on other nodes."""
    return plan_hop(topo.local_of(phys_idx), topo.ep_local)


def mask_choices(phys_idx: torch.Tensor, plan: HopPlan) -> torch.Tensor:
    """The sent copies' choices with those served by other destinations set to −1: (S, k)."""
    return torch.where(plan.choice_mask, phys_idx[plan.send_rows], torch.full_like(plan.send_rows, -1).unsqueeze(1))


@dataclass
class ExpertPlan:
    rows: torch.Tensor              # (M,) received row of each (row, choice) pair, sorted by local expert
    choices: torch.Tensor           # (M,) which of the row's k choices
    tokens_per_expert: torch.Tensor  # (slots_per_rank,)


def plan_experts(local_slot: torch.Tensor, n_local: int) -> ExpertPlan:
    """local_slot (R, k): local expert of each received choice, −1 if served elsewhere → the order of
    the grouped GEMM's rows (by expert, then row, then choice)."""
    R, k = local_slot.shape
    flat = local_slot.reshape(-1)
    valid = (flat >= 0).nonzero(as_tuple=True)[0]
    order = valid[torch.argsort(flat[valid], stable=True)]
    counts = torch.bincount(flat[valid], minlength=n_local) if valid.numel() else \
        torch.zeros(n_local, dtype=torch.long, device=local_slot.device)
    return ExpertPlan(order // k, order % k, counts)


# ----------------------------------------------------------------------------- whole-cluster view
def cluster_plan(phys_idx_per_rank: list[torch.Tensor], topo: Topology, dispatcher: str) -> dict:
    """Simulate one dispatch for every source rank at once (no processes): returns per-rank send
    counts per hop and the rows each final receiver gets, as the collectives would see them.
    Used by tests and by the benchmark's traffic model.

    Returns dict with ``hops``: list over hops of (ep × ep) matrices of copies sent src → dst (global
    EP ranks), and ``received``: for every rank, a list of (source rank, token, local_slot (k,)) rows."""
    ep = topo.ep
    received: list[list] = [[] for _ in range(ep)]
    if dispatcher == "flat":
        m = torch.zeros(ep, ep, dtype=torch.long)
        for src, idx in enumerate(phys_idx_per_rank):
            p = plan_flat(idx, topo)
            m[src] += p.send_counts
            choices = topo.slot_of(mask_choices(idx, p))
            for row, dst, ch in zip(p.send_rows.tolist(), p.send_dest.tolist(), choices):
                received[dst].append((src, row, ch))
        return dict(hops=[m], received=received)
    L, n_nodes = topo.ep_local, topo.ep_nodes
    m1, m2 = torch.zeros(ep, ep, dtype=torch.long), torch.zeros(ep, ep, dtype=torch.long)
    relay: list[list] = [[] for _ in range(ep)]  # rows arriving at each relay: (src, token, phys (k,))
    for src, idx in enumerate(phys_idx_per_rank):
        p = plan_inter(idx, topo)
        local = src % L
        for node, c in enumerate(p.send_counts.tolist()):
            m1[src, node * L + local] += c
        for row, node, ch in zip(p.send_rows.tolist(), p.send_dest.tolist(), mask_choices(idx, p)):
            relay[node * L + local].append((src, row, ch))
    for r in range(ep):
        if not relay[r]:
            continue
        idx = torch.stack([ch for _, _, ch in relay[r]])
        p = plan_intra(idx, topo)
        node = r // L
        for l, c in enumerate(p.send_counts.tolist()):
            m2[r, node * L + l] += c
        choices = topo.slot_of(mask_choices(idx, p))
        for row, l, ch in zip(p.send_rows.tolist(), p.send_dest.tolist(), choices):
            src, tok, _ = relay[r][row]
            received[node * L + l].append((src, tok, ch))
    return dict(hops=[m1, m2], received=received)
