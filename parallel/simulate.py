"""Discrete-event simulation of a pipeline schedule (DeepSeek-V3 report §3.2.1, Table 2: bubble and memory).
Any kind of ``parallel.schedules.SCHEDULES`` runs here, its closed form from its ``Schedule``.

Each rank runs its ``parallel.schedules`` op list in order; an op starts when its rank is free and
every input it needs has arrived: F needs the previous pipe stage's F of the same micro-batch,
B/Bi the next stage's backward (or its own F on the loss stage), W its own Bi — plus ``p2p`` latency
when the producer is on another rank. This is the executor's rule too (sends never block, a rank
waits only on the receive it needs next), so a schedule that stalls here deadlocks for real.

    python -m parallel.simulate --kind dualpipe --ranks 8 --chunks 20 --png dualpipe.png
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Optional

from parallel.schedules import SCHEDULES, Layout, Op, all_schedules, get_schedule, layout


class Deadlock(RuntimeError):
    pass


@dataclass(frozen=True)
class Costs:
    """Per-op times. ``FB`` (an overlapped F&B pair) defaults to F + B: no overlap gain."""
    F: float = 1.0
    B: float = 2.0
    Bi: float = 1.0
    W: float = 1.0
    FB: Optional[float] = None
    p2p: float = 0.0

    def of(self, op: Op) -> float:
        if op.kind == "FB":
            return self.F + self.B if self.FB is None else self.FB
        return getattr(self, op.kind)


@dataclass
class SimResult:
    kind: str
    num_ranks: int
    num_chunks: int
    costs: Costs
    timeline: list[list[tuple[float, float, Op]]]  # per rank: (start, end, op)
    makespan: float
    busy: list[float]
    peak_activations: list[int]     # per rank, in units of one micro-batch on one stage
    param_copies: list[int]         # per rank, in units of one stage's parameters
    num_stages: int                 # PP: model stages (2N for DualPipeV)
    extra: dict = field(default_factory=dict)

    @property
    def bubble(self) -> list[float]:
        return [self.makespan - b for b in self.busy]


def _producer(lay: Layout, part: Op) -> Optional[tuple[str, int, int]]:
    if part.kind == "F":
        prv = lay.prev(part.stage)
        return None if prv is None else ("F", prv, part.mb)
    if part.kind in ("B", "Bi"):
        nxt = lay.next(part.stage)
        return ("F", part.stage, part.mb) if nxt is None else ("B", nxt, part.mb)
    return ("Bi", part.stage, part.mb)  # W


def _done_key(part: Op) -> tuple[str, int, int]:
    return ("B" if part.kind in ("B", "Bi") else part.kind, part.stage, part.mb)


def simulate(kind: str, num_ranks: int, num_chunks: int, costs: Costs = Costs(),
             schedules: Optional[list[list[Op]]] = None) -> SimResult:
    """Times every op of every rank; raises ``Deadlock`` naming the stuck ops when no rank can move."""
    lay = layout(kind, num_ranks)
    scheds = schedules if schedules is not None else all_schedules(kind, num_ranks, num_chunks)
    done: dict[tuple, tuple[float, int]] = {}  # key -> (end time, rank)
    ptr = [0] * num_ranks
    free = [0.0] * num_ranks
    timeline: list[list] = [[] for _ in range(num_ranks)]
    progress = True
    while progress:
        progress = False
        for r in range(num_ranks):
            while ptr[r] < len(scheds[r]):
                op = scheds[r][ptr[r]]
                ready = free[r]
                for part in op.parts():
                    need = _producer(lay, part)
                    if need is None:
                        continue
                    if need[0] == "Bi":  # W waits on the queued Bi, always local
                        need = ("B",) + need[1:]
                    if need not in done:
                        break
                    end, producer_rank = done[need]
                    ready = max(ready, end + (costs.p2p if producer_rank != r else 0.0))
                else:
                    end = ready + costs.of(op)
                    timeline[r].append((ready, end, op))
                    for part in op.parts():
                        done[_done_key(part)] = (end, r)
                    free[r] = end
                    ptr[r] += 1
                    progress = True
                    continue
                break
    if any(ptr[r] < len(scheds[r]) for r in range(num_ranks)):
        stuck = {r: scheds[r][ptr[r]] for r in range(num_ranks) if ptr[r] < len(scheds[r])}
        raise Deadlock(f"{kind} N={num_ranks} C={num_chunks}: no rank can move; waiting ops {stuck}")
    makespan = max(free)
    busy = [sum(e - s for s, e, _ in tl) for tl in timeline]
    return SimResult(kind, num_ranks, num_chunks, costs, timeline, makespan, busy,
                     [_peak_activations(tl) for tl in timeline],
                     [len(lay.stages_of(r)) for r in range(num_ranks)], lay.num_model_stages)


def _peak_activations(tl: list[tuple[float, float, Op]]) -> int:
    """A micro-batch's activations on a stage live from the start of its F to the end of its B
    (or of its W after a Bi: the weight grad still needs the saved inputs)."""
    events = []
    for s, e, op in tl:
        for part in op.parts():
            if part.kind == "F":
                events.append((s, 1))
            elif part.kind in ("B", "W"):
                events.append((e, -1))
    events.sort()  # at equal times frees (−1) come first
    live = peak = 0
    for _, d in events:
        live += d
        peak = max(peak, live)
    return peak


def closed_form_bubble(kind: str, num_ranks: int, costs: Costs = Costs()) -> float:
    """The report's Table 2 (the DualPipe README's) bubble of ``kind``: ``Schedule.bubble``, PP = model stages."""
    return get_schedule(kind).bubble(num_ranks, costs.F, costs.B, costs.W, costs.FB)


def published_memory(kind: str, num_ranks: int, num_chunks: Optional[int] = None) -> tuple[int, int]:
    """(parameter copies in stage units, activations in micro-batches) per device as the report's Table 2
    states them (1F1B, ZB1P: 1, PP; DualPipe, DualPipeV: 2, PP+1): the schedule's stage copies and
    in-flight counts on its busiest rank. ``num_chunks`` defaults to the schedule's fewest."""
    sched = get_schedule(kind)
    C = sched.fewest_chunks(num_ranks) if num_chunks is None else num_chunks
    return max(sched.stage_copies(num_ranks)), max(sched.peak_activations(num_ranks, C))


COLOURS = {"F": "#4c8ed9", "B": "#3fa34d", "Bi": "#9fd89f", "W": "#b58bd6"}
KIND_LABELS = {"F": "F: forward of one stage", "B": "B: full backward (input and weight grads)",
               "Bi": "Bi: input-grad backward (weight grad queued)", "W": "W: a queued weight-grad backward"}
HATCH = "////"   # direction 1 of DualPipe / the returning leg of DualPipeV's V


def direction(res: SimResult, part: Op) -> int:
    """0 or 1: pipe stages N…2N−1 are 1 — DualPipe's second direction (fed on rank N−1) and DualPipeV's
    leg back up the V; 1F1B and ZB1P have N pipe stages, one direction."""
    return int(part.stage >= res.num_ranks)


def box_styles(res: SimResult) -> set[tuple[str, int]]:
    """(op kind, direction) of every box the timeline draws; "FB" for an overlapped pair, direction -1."""
    out = set()
    for tl in res.timeline:
        for _, _, op in tl:
            if op.kind == "FB":
                out.add(("FB", -1))
            for part in op.parts():
                out.add((part.kind, direction(res, part)))
    return out


def legend_entries(res: SimResult) -> list[tuple[str, str]]:
    """(key, label) of the legend: every kind of box drawn, the split F&B box and the two directions."""
    styles = box_styles(res)
    kinds = {k for k, _ in styles}
    out = [(k, KIND_LABELS[k]) for k in ("F", "B", "Bi", "W") if k in kinds]
    if "FB" in kinds:
        out.append(("FB", "F&B: an overlapped pair, F top / B bottom, 'f|b' = their micro-batches"))
    if any(d == 1 for _, d in styles):
        N, C = res.num_ranks, res.num_chunks
        out.append(("dir1", f"hatched: direction 1, micro-batches {C // 2}–{C - 1} fed on rank {N - 1} "
                            f"(plain: direction 0, 0–{C // 2 - 1} fed on rank 0)"
                            if len(layout(res.kind, N).chains) == 2 else
                            f"hatched: the V's way back, stages {N}–{2 * N - 1} from rank {N - 1} to rank 0 "
                            f"(plain: stages 0–{N - 1} down from rank 0)"))
    return out


def time_label(res: SimResult, unit: Optional[str] = None) -> str:
    if unit:
        return f"time ({unit})"
    if res.costs.F == 1:
        return "time (in forward times: 1 = one stage's forward of one micro-batch)"
    return "time (the unit of the cost flags; name it with --unit)"


def draw(res: SimResult, path: str, unit: Optional[str] = None) -> None:
    """One row per rank, one box per op coloured by kind and numbered by micro-batch, direction 1 hatched;
    an FB pair is split top (F) / bottom (B) inside one black border, like the DualPipe README's figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.legend_handler import HandlerBase
    from matplotlib.patches import Rectangle

    def box(x, y, w, h, kind, part=None):
        hatch = HATCH if part is not None and direction(res, part) else None
        ax.add_patch(Rectangle((x, y), w, h, facecolor=COLOURS[kind], hatch=hatch, edgecolor="white", linewidth=0))

    fig, ax = plt.subplots(figsize=(max(8.0, res.makespan * 0.25), 0.5 * res.num_ranks + 2.2))
    for r, tl in enumerate(res.timeline):
        y = res.num_ranks - 1 - r
        for s, e, op in tl:
            if op.kind == "FB":
                box(s, y + 0.45, e - s, 0.45, "F", op.f)
                box(s, y, e - s, 0.45, "B", op.b)
                label = f"{op.f.mb}|{op.b.mb}"
            else:
                box(s, y, e - s, 0.9, op.kind, op)
                label = str(op.mb)
            ax.add_patch(Rectangle((s, y), e - s, 0.9, fill=False, edgecolor="black", linewidth=0.6))
            ax.text((s + e) / 2, y + 0.45, label, ha="center", va="center", fontsize=6)
    ax.set_xlim(0, res.makespan)
    ax.set_ylim(-0.2, res.num_ranks)
    ax.set_yticks([res.num_ranks - 1 - r + 0.45 for r in range(res.num_ranks)])
    ax.set_yticklabels([f"rank {r}" for r in range(res.num_ranks)])
    ax.set_xlabel(time_label(res, unit))

    class Split(HandlerBase):   # the legend's F&B box: F over B in one border
        def create_artists(self, legend, orig, x0, y0, w, h, fontsize, trans):
            return [Rectangle((x0, y0 + h / 2), w, h / 2, color=COLOURS["F"], transform=trans),
                    Rectangle((x0, y0), w, h / 2, color=COLOURS["B"], transform=trans),
                    Rectangle((x0, y0), w, h, fill=False, edgecolor="black", transform=trans)]

    ax.set_title(f"{res.kind}: {res.num_ranks} ranks, {res.num_chunks} micro-batches, max bubble "
                 f"{max(res.bubble):g}; a box is one op of the micro-batch numbered in it", fontsize=9)
    fig.tight_layout()
    entries = legend_entries(res)
    handles = [Rectangle((0, 0), 1, 1, facecolor="white", edgecolor="black", hatch=HATCH) if k == "dir1" else
               Rectangle((0, 0), 1, 1) if k == "FB" else Rectangle((0, 0), 1, 1, color=COLOURS[k]) for k, _ in entries]
    below = 0.55 / (fig.get_figheight() * ax.get_position().height)   # 0.55 inch under the axes, past the x label
    ax.legend(handles, [lab for _, lab in entries], ncol=2, loc="upper left", bbox_to_anchor=(0.0, -below),
              fontsize=7, frameon=False, handler_map={h: Split() for (k, _), h in zip(entries, handles) if k == "FB"})
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def text_timeline(res: SimResult, step: float = 1.0) -> str:
    """One text row per rank, one character per ``step`` of time: F, B, b (Bi), W, X (an F&B pair), . idle."""
    glyph = {"F": "F", "B": "B", "Bi": "b", "W": "W", "FB": "X"}
    width = int(round(res.makespan / step))
    rows = []
    for r, tl in enumerate(res.timeline):
        row = ["."] * width
        for s, e, op in tl:
            for i in range(int(round(s / step)), int(round(e / step))):
                row[i] = glyph[op.kind]
        rows.append(f"rank {r:2d} |{''.join(row)}|")
    return "\n".join(rows)


def report(res: SimResult) -> str:
    pub_params, pub_act = published_memory(res.kind, res.num_ranks)
    lines = [f"{res.kind}: N={res.num_ranks} ranks, PP={res.num_stages} stages, C={res.num_chunks}, "
             f"makespan {res.makespan:g}, closed-form bubble {closed_form_bubble(res.kind, res.num_ranks, res.costs):g}",
             "rank  bubble  peak_act  params(stages)"]
    for r in range(res.num_ranks):
        lines.append(f"{r:4d}  {res.bubble[r]:6g}  {res.peak_activations[r]:8d}  {res.param_copies[r]:6d}")
    lines.append(f"published: params {pub_params}x, activations {pub_act}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m parallel.simulate", description=__doc__.split("\n")[0],
                                 epilog="Prints the makespan, per-rank bubble and peak activations beside the "
                                        "closed-form bubble and the published memory of the report's Table 2.")
    ap.add_argument("--kind", choices=tuple(SCHEDULES), default="dualpipe", help="pipeline schedule (default dualpipe)")
    ap.add_argument("--ranks", type=int, default=8, help="pipeline ranks N (DualPipe: even; default 8)")
    ap.add_argument("--chunks", type=int, default=20,
                    help="micro-batches C per step (DualPipe: even, >= 2N; DualPipeV: >= 2N; default 20)")
    for name, default, what in (("F", 1.0, "time of one stage's forward"), ("B", 2.0, "time of a full backward"),
                                ("Bi", 1.0, "time of an input-grad backward"), ("W", 1.0, "time of a weight-grad backward"),
                                ("p2p", 0.0, "latency of a send between ranks")):
        ap.add_argument(f"--{name}", type=float, default=default, help=f"{what} (default {default:g})")
    ap.add_argument("--FB", type=float, default=None, help="time of an overlapped F&B pair (default F+B: no gain)")
    ap.add_argument("--unit", default=None, help="unit of the times above, for the PNG's time axis (e.g. ms)")
    ap.add_argument("--png", default=None, help="write the timeline here")
    ap.add_argument("--text", type=float, default=None, metavar="STEP", help="print a text timeline, STEP time per char")
    a = ap.parse_args(argv)
    res = simulate(a.kind, a.ranks, a.chunks, Costs(a.F, a.B, a.Bi, a.W, a.FB, a.p2p))
    print(report(res))
    if a.text:
        print(text_timeline(res, a.text))
    if a.png:
        draw(res, a.png, a.unit)
        print(f"timeline: {a.png}")


if __name__ == "__main__":
    main()
