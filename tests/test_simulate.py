"""Simulated bubbles and memory against the DualPipe README's table (report §3.2.1, Table 2)."""
import pytest

from parallel.schedules import KINDS, Op, schedule
from parallel.simulate import (Costs, Deadlock, closed_form_bubble, draw, main, published_memory, simulate)

UNIT = Costs(F=1, B=2, Bi=1, W=1, FB=3, p2p=0)   # the reference costs
GRID = {"1f1b": [(4, 4), (4, 12), (8, 8), (8, 24), (16, 32)], "zb1p": [(4, 4), (4, 12), (8, 8), (8, 24), (16, 32)],
        "dualpipe": [(4, 8), (4, 20), (8, 16), (8, 20), (16, 32)],
        "dualpipev": [(2, 4), (4, 8), (4, 10), (8, 16), (8, 20)]}


@pytest.mark.parametrize("kind,N,C", [(k, n, c) for k in KINDS for n, c in GRID[k]])
def test_bubble_matches_closed_form(kind, N, C):
    res = simulate(kind, N, C, UNIT)
    cf = closed_form_bubble(kind, N, UNIT)
    ops_per_rank = 2 * C if kind == "dualpipev" else C   # a V rank runs two stages of every micro-batch
    assert res.busy == [ops_per_rank * (UNIT.F + UNIT.B)] * N
    if kind in ("1f1b", "zb1p"):
        assert res.bubble == [cf] * N
    else:  # the paper's DualPipe formula is an approximation: within one op's cost per rank
        assert all(abs(b - cf) <= UNIT.FB for b in res.bubble), (res.bubble, cf)


@pytest.mark.parametrize("kind,N,C", [(k, n, c) for k in KINDS for n, c in GRID[k]])
def test_memory_matches_published_table(kind, N, C):
    res = simulate(kind, N, C, UNIT)
    params, acts = published_memory(kind, N)
    assert max(res.peak_activations) == acts
    assert res.param_copies == [params] * N
    assert res.num_stages == (2 * N if kind == "dualpipev" else N)


def test_known_numbers_by_hand():
    # 1F1B, N=2, C=2, F=1, B=2: F0 F1 | . F0 B0 F1 B1 → rank 0 ends with B1 at 9; bubble 3 = (N−1)(F+B)
    res = simulate("1f1b", 2, 2, UNIT)
    assert res.makespan == 9 and res.bubble == [3, 3]
    # with 0.5 latency: rank 1 runs F0 at 1.5, B0 2.5–4.5, F1 4.5, B1 5.5–7.5; rank 0's B1 runs 8–10
    lat = simulate("1f1b", 2, 2, Costs(1, 2, 1, 1, 3, p2p=0.5))
    assert lat.makespan == 10 and [op for s, e, op in lat.timeline[1] if s == 4.5][0].kind == "F"
    # an overlapped F&B cheaper than F+B shortens DualPipe's steady state
    fast = simulate("dualpipe", 4, 16, Costs(1, 2, 1, 1, FB=2.5))
    assert fast.makespan < simulate("dualpipe", 4, 16, UNIT).makespan


def test_deadlock_is_detected():
    scheds = [schedule("1f1b", r, 2, 2) for r in range(2)]
    # rank 0 running its backward before any forward waits on rank 1, which waits on rank 0's F
    scheds[0] = [scheds[0][2]] + scheds[0][:2] + scheds[0][3:]
    with pytest.raises(Deadlock, match="no rank can move"):
        simulate("1f1b", 2, 2, UNIT, schedules=scheds)


def test_cli_and_png(tmp_path, capsys):
    png = tmp_path / "t.png"
    main(["--kind", "dualpipev", "--ranks", "2", "--chunks", "5", "--png", str(png)])
    out = capsys.readouterr().out
    assert "closed-form bubble 2" in out and png.stat().st_size > 5000


def test_text_timeline_dualpipe_n4():
    """Rank 0 of DualPipe N=4, C=8 at unit costs: DualPipe's eight phases with two idle slots (bubble 2)."""
    from parallel.simulate import text_timeline
    rows = text_timeline(simulate("dualpipe", 4, 8, UNIT)).splitlines()
    assert rows[0] == "rank  0 |FFFFbWFXXX.XXXBB.XXXBBbWbW|"
    assert rows[1] == "rank  1 |.FFFFFBBXXXXXXXXXBBBB.bbWW|"
