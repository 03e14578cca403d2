"""The benchmarks' link model (parallel/sim/links.py) on schedules computed by hand: one serial IB and
one serial NVLink link per rank, FIFO, latency + bytes / bandwidth per message. And the line between
that scaffolding and the library: no module of parallel/ outside parallel/sim/ imports it or sleeps."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from parallel.sim.clock import ModelledClock
from parallel.sim.links import LinkModel, predict_route
from tests.dist_utils import run_ranks


def test_defaults_are_the_issue_constants():
    m = LinkModel(unit=1e9)              # GB/s: H800
    assert m.bandwidth == {"inter": 50e9, "intra": 160e9}
    assert m.latency == pytest.approx(4096 / 50e9, rel=1e-15)   # the time of 4 KB on IB


def test_one_link_serialises_two_links_run_together():
    lat = 4096 / 50                      # unit = 1 byte/s per bandwidth unit: latency 81.92
    m = LinkModel(unit=1.0)
    # two 1000-byte messages on IB issued together: the sum of both
    assert m.reserve({"inter": 2000}, {"inter": 2}, now=0.0) == (0.0, pytest.approx(2 * (lat + 1000 / 50)))
    m = LinkModel(unit=1.0)
    # one on IB, one on NVLink: the max
    assert m.reserve({"inter": 1000, "intra": 1600}, now=0.0) == (0.0, pytest.approx(lat + 1000 / 50))
    m = LinkModel(unit=1.0)
    assert m.send({"inter": 1000, "intra": 1600}, now=0.0) == {"inter": (0.0, pytest.approx(lat + 20)),
                                                               "intra": (0.0, pytest.approx(lat + 10))}


def test_fifo_waits_for_the_link_and_idles_when_free():
    m = LinkModel(unit=1.0, latency=1.0)
    assert m.reserve({"inter": 500}, now=0.0) == (0.0, 11.0)
    assert m.reserve({"inter": 500}, now=4.0) == (11.0, 22.0)     # queued behind the first
    assert m.reserve({"intra": 800}, now=4.0) == (4.0, 10.0)      # NVLink was free
    assert m.reserve({"inter": 50}, now=30.0) == (30.0, 32.0)     # idle link: starts when issued
    assert m.reserve({}, now=40.0) == (40.0, 40.0)                # nothing to send (self only)


def _two_by_two():
    """2 nodes × 2 ranks. Hop 1 (IB, same local index): rank 0 sends 1000 B to rank 2; hop 2 (NVLink):
    relay 2 forwards 1600 B to rank 3."""
    b1, b2 = torch.zeros(4, 4, dtype=torch.long), torch.zeros(4, 4, dtype=torch.long)
    b1[0, 2], b2[2, 3] = 1000, 1600
    inter = lambda s, d: ("self" if s == d else "inter") if s % 2 == d % 2 else None  # noqa: E731
    intra = lambda s, d: ("self" if s == d else "intra") if s // 2 == d // 2 else None  # noqa: E731
    return [b1, b2], [inter, intra]


def test_pipelined_route_by_hand():
    hops, links = _two_by_two()
    make = lambda: LinkModel(unit=1.0, latency=1.0)   # noqa: E731  IB 50 B/s, NVLink 160 B/s
    # unchunked: IB 1+20, NVLink 1+10, back: NVLink 1+10, IB 1+20
    assert predict_route(hops, links, 1, make) == pytest.approx(64.0)
    # 2 chunks: IB 0→11→22; NVLink forwards chunk 0 at 11 (→17), chunk 1 at 22 (→28). Back: rank 3
    # returns chunk 0 28→34, chunk 1 34→40; relay 2 sends chunk 0 on IB 34→45, chunk 1 45→56
    assert predict_route(hops, links, 2, make) == pytest.approx(56.0)
    # with no latency the same shape gives 60 and 50; chunks never make the IB bytes cheaper
    make0 = lambda: LinkModel(unit=1.0, latency=0.0)   # noqa: E731
    assert predict_route(hops, links, 1, make0) == pytest.approx(60.0)
    assert predict_route(hops, links, 2, make0) == pytest.approx(50.0)
    assert predict_route(hops, links, 1000, make0) >= 2 * 1000 / 50


def _two_ranks_over_ib(rank, world):
    """Two rounds of a 2-rank all-to-all through ``ModelledTransport`` on IB only (unit 1 B/s, latency 1):
    round 1 rank 0 sends 1000 B, rank 1 100 B; round 2 rank 0 500 B, rank 1 nothing (one empty message)."""
    from types import SimpleNamespace

    import torch.distributed as dist

    import parallel.sim.links as links
    clock = links.time = ModelledClock()   # this spawned rank only
    transport = links.ModelledTransport(links.LinkModel(unit=1.0, latency=1.0))
    hop = SimpleNamespace(group=dist.group.WORLD, links=["self", "inter"] if rank == 0 else ["inter", "self"])
    rounds = []
    for sent in ((1000, 100), (500, 0)):
        n, m = sent[rank], sent[1 - rank]
        buf = torch.full((n, 1), rank + 1, dtype=torch.uint8)
        got = buf.new_empty(m, 1)
        counts = lambda k: [0, k] if rank == 0 else [k, 0]   # noqa: E731  rows to / from the other rank
        t = transport.start(hop, got, buf, counts(n), counts(m), {"inter": n}, {"inter": 1})
        t.wait()
        rounds.append((t.issued, t.done, clock.now, bool((got == 2 - rank).all())))
    return rounds, transport.model_done


def test_modelled_transport_waits_for_the_senders_serial_links():
    """By hand (IB 50 B/s, 1 s per message). Round 1: rank 0's link busy 0→21, rank 1's 0→3; each receiver
    sleeps until its sender's link is done: rank 0 until 3, rank 1 until 21. Round 2, issued at 3 and 21:
    rank 0's link is still busy until 21 (FIFO), so its 500 B go 21→32; rank 1's empty message 21→22."""
    (r0, done0), (r1, done1) = run_ranks(_two_ranks_over_ib, 2, timeout=120)
    assert r0 == [(0.0, 21.0, 3.0, True), (21.0, 32.0, 22.0, True)]
    assert r1 == [(0.0, 3.0, 21.0, True), (21.0, 22.0, 32.0, True)]
    assert (done0, done1) == (22.0, 32.0)


def _sim_imports_and_sleeps(path: Path) -> list[str]:
    """What ``path`` does that only simulation code may: import parallel.sim, call time.sleep."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            if node.module == "time" and any(a.name == "sleep" for a in node.names):
                found.append(f"line {node.lineno}: from time import sleep")
        found += [f"line {node.lineno}: imports {n}" for n in names
                  if n == "parallel.sim" or n.startswith("parallel.sim.")]
        if isinstance(node, ast.Attribute) and node.attr == "sleep" and isinstance(node.value, ast.Name) \
                and node.value.id == "time":
            found.append(f"line {node.lineno}: time.sleep")
    return found


def test_production_parallel_modules_neither_sleep_nor_import_sim():
    root = Path(__file__).resolve().parents[1] / "parallel"
    production = [p for p in sorted(root.rglob("*.py")) if "sim" not in p.relative_to(root).parts]
    assert len(production) > 20                  # the walk found the package
    bad = {str(p.relative_to(root.parent)): f for p in production if (f := _sim_imports_and_sleeps(p))}
    assert bad == {}
    # the checker itself: it sees what the simulation package does
    found = [f.split(": ")[1] for f in _sim_imports_and_sleeps(root / "sim" / "cost.py")]
    assert found == ["time.sleep", "time.sleep"]                 # forward and backward of SleepThrough
