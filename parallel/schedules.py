"""Pipeline schedules as pure data (SPEC §4; report §3.2.1 "DualPipe").

``schedule(kind, rank, num_ranks, num_chunks)`` returns the ordered list of ``Op`` one rank runs;
``layout(kind, num_ranks)`` says which model stage each *pipe stage* is and which rank holds it.
A pipe stage is one (copy of a) model stage on one chain of ranks: DualPipe has two chains
(directions) over the same N model stages, so 2N pipe stages; DualPipeV one chain of 2N stages
folded into a V over N ranks. Nothing here touches torch: tests check schedules without processes
and ``parallel.pipeline`` runs any of them.

Op kinds: F (forward), B (full backward), Bi (input-grad only; the weight grad is queued),
W (run the oldest queued weight grad, FIFO), FB (an F and a B of different micro-batches run as one
overlapped call).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

KINDS = ("1f1b", "zb1p", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class Msg:
    """One P2P message: ``what`` ('act' forward, 'grad' backward) of micro-batch ``mb`` leaving pipe
    stage ``src`` for pipe stage ``dst``; ``peer`` is the other rank."""
    what: str
    src: int
    dst: int
    mb: int
    peer: int

    @property
    def key(self) -> tuple:
        return (self.what, self.src, self.dst, self.mb)


@dataclass(frozen=True)
class Op:
    kind: str                     # F, B, Bi, W or FB
    stage: int = -1               # pipe stage (FB: -1; see f and b)
    mb: int = -1
    f: Optional["Op"] = None      # FB: its forward part
    b: Optional["Op"] = None      # FB: its backward part (a full B)
    sends: tuple[Msg, ...] = field(default=(), compare=False)
    recvs: tuple[Msg, ...] = field(default=(), compare=False)

    def parts(self) -> tuple["Op", ...]:
        return (self.f, self.b) if self.kind == "FB" else (self,)

    def __repr__(self) -> str:
        if self.kind == "FB":
            return f"FB({self.f!r}&{self.b!r})"
        return f"{self.kind}{self.stage}.{self.mb}"


@dataclass(frozen=True)
class Layout:
    """Where pipe stages live. ``chains[c]`` lists pipe stages in forward order; micro-batches
    ``chain_mbs[c]`` flow along chain c."""
    kind: str
    num_ranks: int
    num_model_stages: int
    model_stage: tuple[int, ...]   # per pipe stage
    rank: tuple[int, ...]          # per pipe stage
    chains: tuple[tuple[int, ...], ...]

    def prev(self, ps: int) -> Optional[int]:
        for c in self.chains:
            if ps in c:
                i = c.index(ps)
                return c[i - 1] if i > 0 else None
        raise KeyError(ps)

    def next(self, ps: int) -> Optional[int]:
        for c in self.chains:
            if ps in c:
                i = c.index(ps)
                return c[i + 1] if i + 1 < len(c) else None
        raise KeyError(ps)

    def stages_of(self, rank: int) -> list[int]:
        return [ps for ps, r in enumerate(self.rank) if r == rank]

    def model_stages_of(self, rank: int) -> list[int]:
        return sorted({self.model_stage[ps] for ps in self.stages_of(rank)})


def _check(kind: str, rank: int, num_ranks: int, num_chunks: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown pipeline schedule {kind!r}; choose one of {', '.join(KINDS)}")
    if num_ranks < 1 or not 0 <= rank < num_ranks:
        raise ValueError(f"rank {rank} is not in 0..{num_ranks - 1} (num_ranks={num_ranks})")
    if kind == "dualpipe":
        if num_ranks % 2:
            raise ValueError(f"DualPipe needs an even number of pipeline ranks, got {num_ranks}; use 'dualpipev' for one V")
        if num_chunks % 2 or num_chunks < 2 * num_ranks:
            raise ValueError(f"DualPipe needs an even num_chunks >= 2*num_ranks = {2 * num_ranks}, got {num_chunks}")
    elif kind == "dualpipev":
        if num_chunks < 2 * num_ranks:
            raise ValueError(f"DualPipeV needs num_chunks >= 2*num_ranks = {2 * num_ranks}, got {num_chunks}")
    elif num_chunks < num_ranks:
        raise ValueError(f"{kind} needs num_chunks >= num_ranks = {num_ranks}, got {num_chunks}")


def layout(kind: str, num_ranks: int) -> Layout:
    N = num_ranks
    if kind in ("1f1b", "zb1p"):
        return Layout(kind, N, N, tuple(range(N)), tuple(range(N)), (tuple(range(N)),))
    if kind == "dualpipe":
        # pipe stage s: direction 0, model stage s on rank s; pipe stage N+s: direction 1, model stage s on rank N-1-s
        return Layout(kind, N, N, tuple(range(N)) * 2, tuple(range(N)) + tuple(N - 1 - s for s in range(N)),
                      (tuple(range(N)), tuple(range(N, 2 * N))))
    if kind == "dualpipev":
        return Layout(kind, N, 2 * N, tuple(range(2 * N)), tuple(min(s, 2 * N - 1 - s) for s in range(2 * N)),
                      (tuple(range(2 * N)),))
    raise ValueError(f"unknown pipeline schedule {kind!r}; choose one of {', '.join(KINDS)}")


def chain_mbs(kind: str, num_ranks: int, num_chunks: int) -> tuple[tuple[int, ...], ...]:
    """Micro-batches per chain: DualPipe feeds 0…C/2−1 from rank 0 and C/2…C−1 from rank N−1."""
    if kind == "dualpipe":
        K = num_chunks // 2
        return tuple(range(K)), tuple(range(K, num_chunks))
    return (tuple(range(num_chunks)),)


# ------------------------------------------------------------------------------- op lists
def _one_f_one_b(rank: int, N: int, C: int, zero_bubble: bool) -> list[tuple[str, int, int]]:
    """1F1B (Narayanan et al. 2021) and ZB-H1 (Qi et al. 2023, §3.1): warm-up N−1−r forwards, then
    one F per B. ZB-H1 splits B into Bi and W and keeps r weight grads queued in the steady state
    (rank r's backwards end r Bi-hops before the last rank's), draining them in the cool-down's gaps."""
    warm = min(N - 1 - rank, C)
    ops: list[tuple[str, int, int]] = []
    f = b = w = 0
    for _ in range(warm):
        ops.append(("F", rank, f)); f += 1
    def backward(defer: int) -> None:
        nonlocal b, w
        if not zero_bubble:
            ops.append(("B", rank, b)); b += 1
            return
        ops.append(("Bi", rank, b)); b += 1
        if b - w > defer:
            ops.append(("W", rank, w)); w += 1
    for _ in range(C - warm):
        ops.append(("F", rank, f)); f += 1
        backward(rank)
    for _ in range(warm):
        backward(rank)
    while zero_bubble and w < C:
        ops.append(("W", rank, w)); w += 1
    return ops


def _dualpipe(rank: int, N: int, C: int) -> list[tuple]:
    """SPEC §4's eight phases for rank r of N (N even) with C chunks. Entries are ('F'|'B'|'Bi', dir),
    ('W',) or ('FB', dir_f, dir_b); directions resolve to pipe stages and micro-batches below."""
    H, K, h = N // 2, C // 2, min(rank, N - 1 - rank)
    near = 0 if rank < H else 1
    far = 1 - near
    ops: list[tuple] = []
    ops += [("F", near)] * (2 * (H - h - 1))                                   # 1
    ops += [("F", near), ("F", far)] * (h + 1)                                 # 2
    ops += [("Bi", far), ("W",), ("F", far)] * (H - h - 1)                     # 3
    for i in range(K - 2 * H + h + 1):                                         # 4
        if i == 0 and h == H - 1:
            # middle ranks: their far forward's input is the other middle rank's near output, not yet
            # needed downstream, so F then a full B un-overlapped shortens the bubble (DualPipe code)
            ops += [("F", near), ("B", far)]
        else:
            ops += [("FB", near, far)]
        ops += [("FB", far, near)]
    ops += [("B", far), ("FB", far, near)] * (H - h - 1)                       # 5
    six = [d for _ in range(h + 1) for d in (far, near)]                      # 6
    ops += [("B" if j < h + 1 else "Bi", d) for j, d in enumerate(six)]
    ops += [("W",), ("Bi", near)] * (H - h - 1)                                # 7
    ops += [("W",)] * (h + 1)                                                  # 8
    return ops


def _resolve_dualpipe(ops: list[tuple], rank: int, N: int, C: int, v: bool) -> list[tuple[str, int, int]]:
    """Turn direction-level entries into (kind, pipe stage, mb). For DualPipeV (v=True) ``N`` and ``C``
    are the virtual DualPipe's 2N ranks and 2C chunks: its direction 1 is the V's second leg."""
    K = C // 2
    f_next, b_next = [0, 0], [0, 0]
    queue: list[tuple[str, int, int]] = []

    def stage(d: int) -> int:
        if v:
            return rank if d == 0 else N - 1 - rank
        return rank if d == 0 else N + (N - 1 - rank)

    def mb(d: int, i: int) -> int:
        return i if (v or d == 0) else K + i

    def one(kind: str, d: int) -> tuple[str, int, int]:
        ctr = f_next if kind == "F" else b_next
        op = (kind, stage(d), mb(d, ctr[d]))
        ctr[d] += 1
        if kind == "Bi":
            queue.append(("W", op[1], op[2]))
        return op

    out: list = []
    for e in ops:
        if e[0] == "W":
            out.append(queue.pop(0))
        elif e[0] == "FB":
            out.append(("FB", one("F", e[1]), one("B", e[2])))
        else:
            out.append(one(e[0], e[1]))
    assert not queue and f_next == [K, K] and b_next == [K, K]
    return out


def _attach_messages(raw: list, lay: Layout, rank: int) -> list[Op]:
    def single(kind: str, ps: int, m: int) -> Op:
        sends, recvs = [], []
        prv, nxt = lay.prev(ps), lay.next(ps)
        if kind == "F":
            if prv is not None and lay.rank[prv] != rank:
                recvs.append(Msg("act", prv, ps, m, lay.rank[prv]))
            if nxt is not None and lay.rank[nxt] != rank:
                sends.append(Msg("act", ps, nxt, m, lay.rank[nxt]))
        elif kind in ("B", "Bi"):
            if nxt is not None and lay.rank[nxt] != rank:
                recvs.append(Msg("grad", nxt, ps, m, lay.rank[nxt]))
            if prv is not None and lay.rank[prv] != rank:
                sends.append(Msg("grad", ps, prv, m, lay.rank[prv]))
        return Op(kind, ps, m, sends=tuple(sends), recvs=tuple(recvs))

    ops = []
    for e in raw:
        if e[0] == "FB":
            f, b = single(*e[1]), single(*e[2])
            ops.append(Op("FB", f=f, b=b, sends=f.sends + b.sends, recvs=f.recvs + b.recvs))
        else:
            ops.append(single(*e))
    return ops


def schedule(kind: str, rank: int, num_ranks: int, num_chunks: int) -> list[Op]:
    """The ordered ops rank ``rank`` runs for one training step of ``num_chunks`` micro-batches."""
    _check(kind, rank, num_ranks, num_chunks)
    N, C = num_ranks, num_chunks
    if kind in ("1f1b", "zb1p"):
        raw = _one_f_one_b(rank, N, C, zero_bubble=kind == "zb1p")
    elif kind == "dualpipe":
        raw = _resolve_dualpipe(_dualpipe(rank, N, C), rank, N, C, v=False)
    else:  # DualPipeV: rank r runs rank r of DualPipe on 2N ranks with 2C chunks (SPEC §4)
        raw = _resolve_dualpipe(_dualpipe(rank, 2 * N, 2 * C), rank, 2 * N, 2 * C, v=True)
    return _attach_messages(raw, layout(kind, N), rank)


def all_schedules(kind: str, num_ranks: int, num_chunks: int) -> list[list[Op]]:
    return [schedule(kind, r, num_ranks, num_chunks) for r in range(num_ranks)]
