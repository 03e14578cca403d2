"""The pipeline's point-to-point traffic as NCCL sees it: one order of calls per rank pair that NCCL can
match, and a model of NCCL's matching rules to prove it (DualPipe under NCCL; report §3.2.1).

NCCL ignores P2P tags. Between a pair of ranks PyTorch runs every send and receive on one communicator
and one stream, so the pair behaves as one FIFO channel shared by both directions:

* each rank's calls towards a peer execute in the order it issues them; a call waits for the ones
  before it on that channel;
* a send completes only together with the peer's receive at the head of the peer's side (rendezvous:
  large activations are never buffered eagerly); two sends or two receives facing each other never
  complete — the pair deadlocks;
* the calls of one ``batch_isend_irecv`` group progress together.

The rule (``pair_orders``): the messages between ranks a and b are put in one order — the order their
sends happen in a simulated run of the schedule (``parallel.simulate``, positive op costs) — and both
ranks issue their calls on that channel in exactly that order: sends when their op has computed,
receives eagerly, as soon as every message before them on the channel has been issued by this rank.
No groups are needed. Why it cannot deadlock: take the unexecuted op with the earliest simulated start.
Every message it needs, and every message ahead of those on their channels, was sent by an op with an
earlier simulated start, so already executed and issued; the receiver posted its receives as soon as
its own earlier sends on the channel were out. So that op can run, whatever the ranks' real speeds.
Restricted to one direction the order is the sender's own send order, so gloo (one tag, matched by
posting order per direction) pairs the same messages.

``nccl_check`` runs the executor's rule against the channel model for a schedule and returns, per
received message, the message that filled its buffer.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from parallel.schedules import schedule
from parallel.simulate import simulate


def pair_orders(kind: str, num_ranks: int, num_chunks: int) -> list[dict[int, list[tuple[str, tuple]]]]:
    """Per rank, per peer: the rank's calls on the channel to that peer, in the order to issue them —
    ("send" | "recv", message key)."""
    res = simulate(kind, num_ranks, num_chunks)
    events = []   # (send time, sender, position in the sender's sends, dst rank, key)
    for r, tl in enumerate(res.timeline):
        i = 0
        for _start, end, op in tl:
            for m in op.sends:
                events.append((end, r, i, m.peer, m.key))
                i += 1
    events.sort()
    orders: list[dict[int, list[tuple[str, tuple]]]] = [{} for _ in range(num_ranks)]
    for _t, src, _i, dst, key in events:
        orders[src].setdefault(dst, []).append(("send", key))
        orders[dst].setdefault(src, []).append(("recv", key))
    return orders


class ChannelCursor:
    """Where a rank stands on each of its channels: ``receives_due(peer)`` gives the receives to post
    now (those before this rank's next send on the channel); ``sent(peer, key)`` moves past a send and
    checks it is the one the order expects."""

    def __init__(self, orders: dict[int, list[tuple[str, tuple]]]):
        self.orders, self.pos = orders, {peer: 0 for peer in orders}

    def receives_due(self, peer: int) -> list[tuple]:
        order, i, keys = self.orders[peer], self.pos[peer], []
        while i < len(order) and order[i][0] == "recv":
            keys.append(order[i][1])
            i += 1
        self.pos[peer] = i
        return keys

    def sent(self, peer: int, key: tuple) -> None:
        i = self.pos[peer]
        if i >= len(self.orders[peer]) or self.orders[peer][i] != ("send", key):
            raise RuntimeError(f"send {key} to rank {peer} out of the channel order "
                               f"(expected {self.orders[peer][i] if i < len(self.orders[peer]) else 'nothing'})")
        self.pos[peer] = i + 1

    def finished(self) -> bool:
        return all(self.pos[p] == len(o) for p, o in self.orders.items())


class NcclDeadlock(RuntimeError):
    pass


@dataclass
class _Call:
    kind: str          # "send" | "recv"
    key: tuple
    done: bool = False


def nccl_check(kind: str, num_ranks: int, num_chunks: int) -> dict[tuple, tuple]:
    """Runs every rank's ops with the channel rule against the NCCL model (stand-alone calls, rendezvous,
    one FIFO per pair for both directions). Returns, per received key, the key of the message that
    filled it. Raises ``NcclDeadlock`` naming the waiting ranks and the channel heads."""
    N = num_ranks
    ops = [schedule(kind, r, N, num_chunks) for r in range(N)]
    cursors = [ChannelCursor(o) for o in pair_orders(kind, N, num_chunks)]
    chan = {(r, p): deque() for r in range(N) for p in range(N) if r != p}   # r's side of the pair (r, p)
    got: dict[int, dict[tuple, tuple]] = {r: {} for r in range(N)}
    delivered: dict[tuple, tuple] = {}
    pc = [0] * N

    def post_receives(r: int) -> None:
        for peer in cursors[r].orders:
            chan[(r, peer)].extend(_Call("recv", k) for k in cursors[r].receives_due(peer))

    def progress() -> bool:
        moved = False
        for (r, p), mine in chan.items():
            if r > p:
                continue
            theirs = chan[(p, r)]
            while mine and theirs and mine[0].kind != theirs[0].kind:
                send, recv, dst = (mine[0], theirs[0], p) if mine[0].kind == "send" else (theirs[0], mine[0], r)
                got[dst][recv.key] = send.key
                mine.popleft(), theirs.popleft()
                moved = True
        return moved

    for r in range(N):
        post_receives(r)
    while any(pc[r] < len(ops[r]) for r in range(N)):
        moved = False
        for r in range(N):
            while pc[r] < len(ops[r]) and all(m.key in got[r] for m in ops[r][pc[r]].recvs):
                op = ops[r][pc[r]]
                for m in op.recvs:
                    delivered[m.key] = got[r].pop(m.key)
                for m in op.sends:                      # the op computed: its sends go out
                    cursors[r].sent(m.peer, m.key)
                    chan[(r, m.peer)].append(_Call("send", m.key))
                    chan[(r, m.peer)].extend(_Call("recv", k) for k in cursors[r].receives_due(m.peer))
                pc[r] += 1
                moved = True
        moved |= progress()
        if not moved:
            stuck = {r: [m.key for m in ops[r][pc[r]].recvs] for r in range(N) if pc[r] < len(ops[r])}
            heads = {k: (q[0].kind, q[0].key) for k, q in chan.items() if q}
            raise NcclDeadlock(f"{kind} PP{N} C{num_chunks}: ranks waiting for {stuck}; channel heads {heads}")
    while progress():
        pass
    left = {k: [(c.kind, c.key) for c in q] for k, q in chan.items() if q}
    if left or not all(c.finished() for c in cursors):
        raise NcclDeadlock(f"{kind} PP{N} C{num_chunks}: calls never completed at the step's end: {left}")
    return delivered
