"""Device mesh: nodes × ranks per node, and the process groups of each kind of parallelism.

Rank layout (pipeline outermost, expert parallelism innermost, so that an EP group spans whole
nodes and its intra-node traffic stays on NVLink):

    rank = stage · S + replica · ep + ep_rank          S = world / pp ranks per pipeline stage
    node = rank // ranks_per_node,  local = rank % ranks_per_node

Groups (each as a list of global ranks, ascending, so group rank = position in the list):
- ``ep``:    the ep consecutive ranks that share one copy of the routed experts;
- ``dp``:    every rank of this pipeline stage (replicated parameters are averaged over it);
- ``edp``:   ranks of this stage with the same ep_rank (one expert shard's data-parallel copies);
- ``pp``:    ranks at the same place in every stage;
- ``ep_intra``: the ranks of this EP group on this node (the NVLink hop of report §3.2.2);
- ``ep_inter``: the ranks of this EP group with this rank's local index, one per node (the IB hop).

``MeshLayout`` is pure (ranks and sizes, no processes); ``Mesh`` adds torch.distributed groups.
The topology comes from ParallelConfig (nodes, ranks_per_node) for a simulated cluster on one
machine, else from torchrun's environment (LOCAL_WORLD_SIZE, WORLD_SIZE).

Every process group of the parallel code is made here (``new_group``, ``Mesh.new_group``,
``group_of_ranks``), with ``parallel.timeout_s``: torch gives a new group a 30-minute timeout of its
own, not the default group's, and a hung peer must fail every collective within the configured time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Sequence

import torch.distributed as dist

from dsv3.errors import UserError


@dataclass(frozen=True)
class MeshLayout:
    world: int
    rank: int
    nodes: int
    ranks_per_node: int
    pp: int = 1
    ep: int = 1

    def __post_init__(self):
        w, rpn = self.world, self.ranks_per_node
        if self.nodes * rpn != w:
            raise UserError(f"parallel.nodes × parallel.ranks_per_node = {self.nodes}×{rpn} but the world has {w} ranks")
        if w % self.pp:
            raise UserError(f"parallel.pp={self.pp} does not divide the world size {w}")
        if (w // self.pp) % self.ep:
            raise UserError(f"parallel.ep={self.ep} does not divide the {w // self.pp} ranks of a pipeline stage")
        if not (self.ep % rpn == 0 or rpn % self.ep == 0):
            raise UserError(f"parallel.ep={self.ep} must be a multiple or a divisor of ranks_per_node={rpn}, "
                            "so that an expert-parallel group spans whole nodes or lies inside one")
        if not 0 <= self.rank < w:
            raise UserError(f"rank {self.rank} outside a world of {w}")

    # ------------------------------------------------------------------ coordinates
    @property
    def stage_size(self) -> int:
        return self.world // self.pp

    @property
    def dp(self) -> int:
        """Data-parallel degree of the replicated parameters (ranks per stage)."""
        return self.stage_size

    @property
    def stage(self) -> int:
        return self.rank // self.stage_size

    @property
    def node(self) -> int:
        return self.rank // self.ranks_per_node

    @property
    def local_rank(self) -> int:
        return self.rank % self.ranks_per_node

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def ep_nodes(self) -> int:
        """Nodes one EP group spans (1 when the group lies inside a node)."""
        return max(1, self.ep // self.ranks_per_node)

    @property
    def ep_local(self) -> int:
        """Ranks of one EP group per node."""
        return min(self.ep, self.ranks_per_node)

    @property
    def ep_node(self) -> int:
        """This rank's node index inside its EP group."""
        return self.ep_rank // self.ep_local

    @property
    def ep_local_rank(self) -> int:
        return self.ep_rank % self.ep_local

    # ------------------------------------------------------------------ groups as rank lists
    def all_groups(self) -> dict[str, list[list[int]]]:
        """Every group of every kind, for the whole world (each rank must create them in this order)."""
        w, S, ep, L = self.world, self.stage_size, self.ep, self.ep_local
        out: dict[str, list[list[int]]] = {k: [] for k in ("ep", "dp", "edp", "pp", "ep_intra", "ep_inter")}
        for s in range(self.pp):
            base = s * S
            out["dp"].append(list(range(base, base + S)))
            for e in range(ep):
                out["edp"].append(list(range(base + e, base + S, ep)))
            for g in range(S // ep):
                first = base + g * ep
                out["ep"].append(list(range(first, first + ep)))
                for n in range(self.ep_nodes):
                    out["ep_intra"].append(list(range(first + n * L, first + (n + 1) * L)))
                for l in range(L):
                    out["ep_inter"].append(list(range(first + l, first + ep, L)))
        out["pp"] = [list(range(i, w, S)) for i in range(S)]
        return out

    def my_groups(self) -> dict[str, list[int]]:
        return {k: next(g for g in gs if self.rank in g) for k, gs in self.all_groups().items()}


def topology_from_env(nodes: int = 0, ranks_per_node: int = 0, world: Optional[int] = None) -> tuple[int, int]:
    """(nodes, ranks_per_node): from the config when given, else torchrun's LOCAL_WORLD_SIZE."""
    world = world if world is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if ranks_per_node <= 0:
        ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world)) if nodes <= 0 else world // max(nodes, 1)
    if nodes <= 0:
        nodes = world // ranks_per_node
    return nodes, ranks_per_node


def new_group(ranks: Sequence[int], timeout_s: Optional[float] = None, local_sync: bool = False):
    """A process group over the global ``ranks``; its collectives fail after ``timeout_s`` seconds
    (None: torch's default). Collective over the whole world unless ``local_sync`` (then only the
    member ranks take part: ``use_local_synchronization``)."""
    timeout = None if timeout_s is None else timedelta(seconds=timeout_s)
    return dist.new_group(list(ranks), timeout=timeout, use_local_synchronization=local_sync)


_BY_RANKS: dict = {"world": None, "groups": {}}


def group_of_ranks(ranks: tuple[int, ...], timeout_s: Optional[float] = None):
    """The process group of one set of global ranks, made by those ranks only (``local_sync``): pipelines
    side by side (one per data-parallel index, PP × EP) each make their own groups. One group per rank set
    for the life of the default group (the first call's timeout holds): pipelines built again over the
    same ranks reuse it, so the rank set's hashed name never rendezvouses twice."""
    if _BY_RANKS["world"] is not dist.group.WORLD:
        _BY_RANKS.update(world=dist.group.WORLD, groups={})
    if ranks not in _BY_RANKS["groups"]:
        _BY_RANKS["groups"][ranks] = new_group(ranks, timeout_s, local_sync=True)
    return _BY_RANKS["groups"][ranks]


class Mesh:
    """A MeshLayout plus its torch.distributed process groups (``mesh.group("ep")``), each failing a
    collective that waits longer than ``timeout_s``."""

    def __init__(self, layout: MeshLayout, backend_groups: dict[str, object], timeout_s: Optional[float] = None):
        self.layout = layout
        self._groups = backend_groups
        self.ranks = layout.my_groups()
        self.timeout_s = timeout_s

    def __getattr__(self, name):  # coordinates come from the layout
        return getattr(self.__dict__["layout"], name)

    def group(self, kind: str):
        return self._groups[kind]

    def new_group(self, ranks: Sequence[int]):
        """Another group over global ``ranks`` with the mesh's timeout (collective: every rank calls it,
        in the same order)."""
        return new_group(ranks, self.timeout_s)

    @classmethod
    def from_config(cls, pcfg=None, *, ep: Optional[int] = None, pp: Optional[int] = None) -> "Mesh":
        """Build the mesh on an initialised default process group. ``pcfg`` is a ParallelConfig
        (nodes/ranks_per_node 0 = from the environment; its timeout_s for every group); ``ep``/``pp``
        override its fields."""
        world, rank = dist.get_world_size(), dist.get_rank()
        nodes, rpn = topology_from_env(getattr(pcfg, "nodes", 0), getattr(pcfg, "ranks_per_node", 0), world)
        layout = MeshLayout(world, rank, nodes, rpn,
                            pp if pp is not None else getattr(pcfg, "pp", 1),
                            ep if ep is not None else getattr(pcfg, "ep", 1))
        timeout_s = getattr(pcfg, "timeout_s", None)
        groups: dict[str, object] = {}
        for kind, lists in layout.all_groups().items():
            for ranks in lists:  # every rank creates every group, in the same order
                g = dist.group.WORLD if len(ranks) == world else new_group(ranks, timeout_s)
                if rank in ranks:
                    groups[kind] = g
        return cls(layout, groups, timeout_s)
