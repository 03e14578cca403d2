"""Pipeline schedules as pure data (report §3.2.1 "DualPipe", Table 2).

Each kind is one ``Schedule`` in ``SCHEDULES``: its layout, its op lists, the fewest micro-batches it
runs, the rules on pp and chunk counts, whether it pairs F and B, its bubble formula and its peak
in-flight micro-batches. The config, the batch split, the trainer, the simulator and the planner read
that object, so a new kind is one ``register_schedule`` call (tests/test_schedule_registry.py adds one
from a test module alone).

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
from typing import Callable, Optional

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


def _line_layout(kind: str, N: int) -> Layout:
    """Model stage s on rank s, one chain (1F1B, ZB1P)."""
    return Layout(kind, N, N, tuple(range(N)), tuple(range(N)), (tuple(range(N)),))


def _dualpipe_layout(N: int) -> Layout:
    # pipe stage s: direction 0, model stage s on rank s; pipe stage N+s: direction 1, model stage s on rank N-1-s
    return Layout("dualpipe", N, N, tuple(range(N)) * 2, tuple(range(N)) + tuple(N - 1 - s for s in range(N)),
                  (tuple(range(N)), tuple(range(N, 2 * N))))


def _v_layout(N: int) -> Layout:
    """2N model stages folded into a V: rank r holds stages r and 2N−1−r."""
    return Layout("dualpipev", N, 2 * N, tuple(range(2 * N)), tuple(min(s, 2 * N - 1 - s) for s in range(2 * N)),
                  (tuple(range(2 * N)),))


def _one_chain(num_ranks: int, num_chunks: int) -> tuple[tuple[int, ...], ...]:
    return (tuple(range(num_chunks)),)


def _dualpipe_chains(num_ranks: int, num_chunks: int) -> tuple[tuple[int, ...], ...]:
    """DualPipe feeds 0…C/2−1 from rank 0 and C/2…C−1 from rank N−1."""
    K = num_chunks // 2
    return tuple(range(K)), tuple(range(K, num_chunks))


def _behind_in_chain(num_stages: int, stage: int, num_chunks: int) -> int:
    """Micro-batches whose activations model stage ``stage`` holds at the peak when a rank warms up one
    forward per stage behind it: N − s (1F1B, ZB1P; and on each DualPipe holder, which runs 1F1B's count
    per direction), so a DualPipe rank holds N − r + r + 1 = PP + 1 (report Table 2: PP, PP, PP+1, PP+1);
    DualPipeV is DualPipe on 2·PP stages."""
    return num_stages - stage


Raw = list  # op-list entries: (kind, pipe stage, mb) or ("FB", (F, stage, mb), (B, stage, mb))


@dataclass(frozen=True)
class Schedule:
    """One pipeline schedule kind: everything the config, the batch split, the trainer, the simulator and
    the planner ask of it.

    ``build_layout(num_ranks)`` places the pipe stages; ``build_ops(rank, num_ranks, num_chunks)`` is the
    rank's op list as raw entries, ``build_chains(num_ranks, num_chunks)`` the micro-batches of each chain.
    ``bubble_formula(PP, F, B, W, FB)`` is the per-rank bubble of the report's Table 2 with PP the number
    of model stages; ``in_flight(num_stages, stage, num_chunks)`` the micro-batches whose activations a
    model stage holds at the peak (the planner's activation multiplier; the simulator measures it)."""
    name: str                                      # parallel.pp_schedule
    label: str                                     # the name in error messages
    build_layout: Callable[[int], Layout]
    build_ops: Callable[[int, int, int], Raw]
    bubble_formula: Callable[[int, float, float, float, float], float]
    model_stages_per_rank: int = 1                 # the model is cut into this × pp stages (DualPipeV's V: 2)
    chunks_per_rank: int = 1                       # fewest micro-batches per step: this × pp
    even_chunks: bool = False                      # the chunk count must be even (DualPipe: two halves)
    even_ranks: bool = False                       # pp must be even (DualPipe: two mirrored halves)
    odd_ranks_instead: str = ""                    # the kind to suggest for an odd pp
    overlaps_f_and_b: bool = False                 # FB ops pair one chunk's F with another's B (report §3.2.1)
    build_chains: Callable[[int, int], tuple[tuple[int, ...], ...]] = _one_chain
    in_flight: Callable[[int, int, int], int] = _behind_in_chain

    def layout(self, num_ranks: int) -> Layout:
        return self.build_layout(num_ranks)

    def num_model_stages(self, pp: int) -> int:
        return self.model_stages_per_rank * pp

    def stage_copies(self, num_ranks: int) -> list[int]:
        """Pipe stages (stage copies) per rank, in units of one model stage's parameters."""
        lay = self.layout(num_ranks)
        return [len(lay.stages_of(r)) for r in range(num_ranks)]

    def fewest_chunks(self, pp: int) -> int:
        """Micro-batches per step the schedule needs on ``pp`` ranks (1 without a pipeline)."""
        return 1 if pp == 1 else self.chunks_per_rank * pp

    def needs_even_chunks(self, pp: int) -> bool:
        return self.even_chunks and pp > 1

    def accepts_chunks(self, pp: int, chunks: int) -> bool:
        return chunks >= self.fewest_chunks(pp) and not (self.needs_even_chunks(pp) and chunks % 2)

    def check(self, rank: int, num_ranks: int, num_chunks: int) -> None:
        """A ValueError naming the broken rule when the schedule cannot run these arguments."""
        N, C = num_ranks, num_chunks
        if N < 1 or not 0 <= rank < N:
            raise ValueError(f"rank {rank} is not in 0..{N - 1} (num_ranks={N})")
        if self.even_ranks and N % 2:
            instead = f"; use {self.odd_ranks_instead!r} for an odd number" if self.odd_ranks_instead else ""
            raise ValueError(f"{self.label} needs an even number of pipeline ranks, got {N}{instead}")
        need = self.chunks_per_rank * N
        if C < need or (self.even_chunks and C % 2):
            ranks = "num_ranks" if self.chunks_per_rank == 1 else f"{self.chunks_per_rank}*num_ranks"
            raise ValueError(f"{self.label} needs {'an even ' if self.even_chunks else ''}num_chunks >= "
                             f"{ranks} = {need}, got {C}")

    def ops(self, rank: int, num_ranks: int, num_chunks: int) -> list[Op]:
        """The ordered ops rank ``rank`` runs for one training step of ``num_chunks`` micro-batches."""
        self.check(rank, num_ranks, num_chunks)
        raw = self.build_ops(rank, num_ranks, num_chunks)
        return _attach_messages(raw, self.layout(num_ranks), rank)

    def chain_mbs(self, num_ranks: int, num_chunks: int) -> tuple[tuple[int, ...], ...]:
        return self.build_chains(num_ranks, num_chunks)

    def bubble(self, num_ranks: int, F: float, B: float, W: float, FB: Optional[float] = None) -> float:
        """Table 2's bubble per rank; ``FB`` (an overlapped F&B pair) defaults to F + B."""
        return self.bubble_formula(self.num_model_stages(num_ranks), F, B, W, F + B if FB is None else FB)

    def peak_activations(self, num_ranks: int, num_chunks: int) -> list[int]:
        """Per rank: micro-batches of activations held at the peak, summed over the model stages it holds."""
        lay, S = self.layout(num_ranks), self.num_model_stages(num_ranks)
        return [sum(self.in_flight(S, s, num_chunks) for s in lay.model_stages_of(r)) for r in range(num_ranks)]


SCHEDULES: dict[str, Schedule] = {}


def register_schedule(sched: Schedule) -> Schedule:
    """Add a kind to ``SCHEDULES`` (and so to ``parallel.pp_schedule``); its layout is checked against
    ``model_stages_per_rank`` on 2 and 4 ranks."""
    if sched.name in SCHEDULES:
        raise ValueError(f"pipeline schedule {sched.name!r} is already registered")
    for N in (2, 4):
        lay = sched.layout(N)
        if lay.kind != sched.name or lay.num_model_stages != sched.num_model_stages(N) or \
                sorted(set(lay.rank)) != list(range(N)):
            raise ValueError(f"{sched.name}: layout on {N} ranks has kind {lay.kind!r}, {lay.num_model_stages} model "
                             f"stages over ranks {sorted(set(lay.rank))}; expected {sched.num_model_stages(N)} "
                             f"(model_stages_per_rank={sched.model_stages_per_rank}) over 0..{N - 1}")
    SCHEDULES[sched.name] = sched
    return sched


def unregister_schedule(name: str) -> None:
    get_schedule(name)
    del SCHEDULES[name]


def get_schedule(name: str) -> Schedule:
    try:
        return SCHEDULES[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown pipeline schedule {name!r}; choose one of {', '.join(SCHEDULES)}") from None


def _check(kind: str, rank: int, num_ranks: int, num_chunks: int) -> None:
    get_schedule(kind).check(rank, num_ranks, num_chunks)


def layout(kind: str, num_ranks: int) -> Layout:
    return get_schedule(kind).layout(num_ranks)


def chain_mbs(kind: str, num_ranks: int, num_chunks: int) -> tuple[tuple[int, ...], ...]:
    """Micro-batches per chain: DualPipe feeds 0…C/2−1 from rank 0 and C/2…C−1 from rank N−1."""
    return get_schedule(kind).chain_mbs(num_ranks, num_chunks)


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
    """DualPipe's eight phases (report §3.2.1, Figure 5; deepseek-ai/DualPipe) for rank r of N (N even) with
    C chunks. Entries are ('F'|'B'|'Bi', dir), ('W',) or ('FB', dir_f, dir_b); directions resolve to pipe
    stages and micro-batches below."""
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
    return get_schedule(kind).ops(rank, num_ranks, num_chunks)


def all_schedules(kind: str, num_ranks: int, num_chunks: int) -> list[list[Op]]:
    return [schedule(kind, r, num_ranks, num_chunks) for r in range(num_ranks)]


# ------------------------------------------------------------------------------- the built-in kinds
def _one_f_one_b_bubble(PP: int, F: float, B: float, W: float, FB: float) -> float:
    return (PP - 1) * (F + B)


def _zb1p_bubble(PP: int, F: float, B: float, W: float, FB: float) -> float:
    return (PP - 1) * (F + B - 2 * W)


def _dualpipe_bubble(PP: int, F: float, B: float, W: float, FB: float) -> float:
    return (PP / 2 - 1) * (FB + B - 3 * W)


for _sched in (
    Schedule("1f1b", "1f1b", lambda N: _line_layout("1f1b", N),
             lambda r, N, C: _one_f_one_b(r, N, C, zero_bubble=False), _one_f_one_b_bubble),
    Schedule("zb1p", "zb1p", lambda N: _line_layout("zb1p", N),
             lambda r, N, C: _one_f_one_b(r, N, C, zero_bubble=True), _zb1p_bubble),
    Schedule("dualpipe", "DualPipe", _dualpipe_layout,
             lambda r, N, C: _resolve_dualpipe(_dualpipe(r, N, C), r, N, C, v=False), _dualpipe_bubble,
             chunks_per_rank=2, even_chunks=True, even_ranks=True, odd_ranks_instead="dualpipev",
             overlaps_f_and_b=True, build_chains=_dualpipe_chains),
    # DualPipeV: rank r runs rank r of DualPipe on 2N ranks with 2C chunks (report §3.2.1)
    Schedule("dualpipev", "DualPipeV", _v_layout,
             lambda r, N, C: _resolve_dualpipe(_dualpipe(r, 2 * N, 2 * C), r, 2 * N, 2 * C, v=True),
             _dualpipe_bubble, model_stages_per_rank=2, chunks_per_rank=2, overlaps_f_and_b=True),
):
    register_schedule(_sched)
KINDS = tuple(SCHEDULES)   # the built-in kinds
