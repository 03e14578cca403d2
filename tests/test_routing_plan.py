"""Routing plans as pure functions (no processes): copies per (row, destination), order, masks, the
whole-cluster simulation delivering every (token, choice) exactly once, and node-limited inter-node copies."""
from __future__ import annotations

import torch

from dsv3.config import MoEConfig
from dsv3.model.moe import Gate
from parallel.placement import Placement
from parallel.routing_plan import Topology, cluster_plan, mask_choices, plan_experts, plan_hop


def test_plan_hop_one_copy_per_destination_sorted():
    # 4 rows, k = 3; destinations of each choice (−1: not in this table)
    dest = torch.tensor([[2, 0, 2], [1, 1, 1], [-1, -1, -1], [0, 2, -1]])
    p = plan_hop(dest, 3)
    assert p.send_dest.tolist() == [0, 0, 1, 2, 2]
    assert p.send_rows.tolist() == [0, 3, 1, 0, 3]
    assert p.send_counts.tolist() == [2, 1, 2]
    assert p.choice_mask.tolist() == [[False, True, False], [True, False, False], [True, True, True],
                                      [True, False, True], [False, True, False]]
    masked = mask_choices(torch.tensor([[5, 6, 7], [8, 9, 10], [0, 0, 0], [1, 2, 3]]), p)
    assert masked.tolist() == [[-1, 6, -1], [1, -1, -1], [8, 9, 10], [5, -1, 7], [-1, 2, -1]]


def test_plan_hop_empty():
    p = plan_hop(torch.zeros(0, 4, dtype=torch.long), 3)
    assert p.send_counts.tolist() == [0, 0, 0] and p.send_rows.numel() == 0


def test_plan_experts_sorted_by_expert_then_row():
    local = torch.tensor([[1, -1], [0, 1], [-1, -1], [1, 0]])
    p = plan_experts(local, 3)
    assert p.tokens_per_expert.tolist() == [2, 3, 0]
    assert list(zip(p.rows.tolist(), p.choices.tolist())) == [(1, 0), (3, 1), (0, 0), (1, 1), (3, 0)]


def _router_choices(n_ranks, tokens, topk_group, seed=0, E=32, groups=4, k=6, dim=48):
    torch.manual_seed(seed)
    gate = Gate(dim, MoEConfig(n_routed_experts=E, n_activated_experts=k, n_group=groups, topk_group=topk_group))
    torch.nn.init.normal_(gate.weight, std=0.3)
    return [gate(torch.randn(tokens + r, dim))[1] for r in range(n_ranks)]   # uneven token counts


def test_cluster_plan_delivers_every_choice_once():
    topo = Topology(ep_nodes=4, ep_local=2, slots_per_rank=4)     # 32 experts, 8 ranks, group = node
    idx = _router_choices(8, 20, topk_group=2)
    want = sorted((src, t, int(e)) for src, ii in enumerate(idx) for t in range(ii.shape[0]) for e in ii[t])
    for kind in ("flat", "two_hop"):
        res = cluster_plan(idx, topo, kind)
        got = []
        for rank, rows in enumerate(res["received"]):
            for src, t, slots in rows:
                got += [(src, t, rank * 4 + int(s)) for s in slots if s >= 0]
        assert sorted(got) == want, kind
        # send counts of the last hop add up to the rows received
        assert [int(c) for c in res["hops"][-1].sum(0)] == [len(r) for r in res["received"]]


def test_inter_node_copies_bounded_by_topk_group():
    topo = Topology(ep_nodes=4, ep_local=2, slots_per_rank=4)
    node_of_rank = torch.arange(8) // 2
    remote = node_of_rank.view(-1, 1) != node_of_rank.view(1, -1)
    for topk_group in (1, 2, 4):
        idx = _router_choices(8, 30, topk_group, seed=topk_group)
        n_tok = sum(i.shape[0] for i in idx)
        two = cluster_plan(idx, topo, "two_hop")["hops"][0]
        flat = cluster_plan(idx, topo, "flat")["hops"][0]
        inter_two, inter_flat = int(two[remote].sum()), int(flat[remote].sum())
        # exact: distinct remote nodes per token (two-hop), distinct remote ranks (flat)
        want_two = sum(len(set((i // 8).tolist()) - {src // 2}) for src, ii in enumerate(idx) for i in ii)
        want_flat = sum(len({r for r in (i // 4).tolist() if r // 2 != src // 2}) for src, ii in enumerate(idx) for i in ii)
        assert (inter_two, inter_flat) == (want_two, want_flat)
        assert inter_two <= topk_group * n_tok
        assert max(len(set((i // 8).tolist())) for ii in idx for i in ii) <= topk_group
        if topk_group > 1:
            assert inter_flat > inter_two   # same routing, fewer network copies with the relay
        # the intra hop never crosses nodes
        intra = cluster_plan(idx, topo, "two_hop")["hops"][1]
        assert int(intra[remote].sum()) == 0


def test_replicas_preserve_logical_expert_and_spread():
    pl = Placement((0, 1, 2, 3, 1, 1, 2, 0), n_logical=4, ep=4)
    idx = torch.tensor([[1, 2]] * 9)
    phys = pl.to_physical(idx)
    assert all(pl.phys_to_log[p] == e for p, e in zip(phys.flatten().tolist(), idx.flatten().tolist()))
    assert torch.bincount(phys[:, 0], minlength=8).tolist() == [0, 3, 0, 0, 3, 3, 0, 0]
    assert pl.local_experts(2) == [1, 1]
