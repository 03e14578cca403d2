"""Pipeline schedules as data (report §3.2.1): ordering, message matching, phase counts, errors."""
from collections import Counter

import pytest

from parallel.schedules import KINDS, all_schedules, chain_mbs, layout, schedule

CASES = [(k, n, c) for k in KINDS for n, c in
         {"1f1b": [(1, 1), (2, 2), (4, 4), (4, 9), (8, 16)], "zb1p": [(1, 3), (2, 2), (4, 4), (4, 9), (8, 16)],
          "dualpipe": [(2, 4), (4, 8), (4, 12), (8, 16), (8, 20)],
          "dualpipev": [(1, 2), (2, 4), (2, 5), (4, 8), (4, 11)]}[k]]


def _parts(ops):
    for op in ops:
        yield from op.parts()


@pytest.mark.parametrize("kind,N,C", CASES)
def test_every_stage_runs_f_then_b_then_w_once(kind, N, C):
    lay = layout(kind, N)
    mbs = chain_mbs(kind, N, C)
    for r, ops in enumerate(all_schedules(kind, N, C)):
        seen = {}
        for i, p in enumerate(_parts(ops)):
            assert lay.rank[p.stage] == r, f"{p} runs on rank {r}, layout puts it on {lay.rank[p.stage]}"
            seen.setdefault((p.stage, p.mb), []).append((p.kind, i))
        expected = {(ps, m) for c, chain in enumerate(lay.chains) for ps in chain for m in mbs[c]
                    if lay.rank[ps] == r}
        assert set(seen) == expected
        for key, events in seen.items():
            kinds = [k for k, _ in events]
            assert kinds in (["F", "B"], ["F", "Bi", "W"]), f"rank {r} stage/mb {key}: {kinds}"
        # W runs the oldest queued weight grad (FIFO)
        queue = []
        for p in _parts(ops):
            if p.kind == "Bi":
                queue.append((p.stage, p.mb))
            elif p.kind == "W":
                assert queue.pop(0) == (p.stage, p.mb)
        assert not queue


@pytest.mark.parametrize("kind,N,C", CASES)
def test_sends_match_receives_in_order(kind, N, C):
    scheds = all_schedules(kind, N, C)
    sent, recv = Counter(), Counter()
    order_s, order_r = {}, {}
    for r, ops in enumerate(scheds):
        for op in ops:
            for m in op.sends:
                assert m.peer != r
                sent[(r, m.peer) + m.key] += 1
                order_s.setdefault((r, m.peer, m.what), []).append(m.key)
            for m in op.recvs:
                recv[(m.peer, r) + m.key] += 1
                order_r.setdefault((m.peer, r, m.what), []).append(m.key)
    assert sent == recv and all(v == 1 for v in sent.values())
    # per channel (sender, receiver, kind) both sides agree on the order: no tag juggling needed
    assert order_s == order_r


@pytest.mark.parametrize("N,C", [(2, 4), (4, 8), (4, 12), (6, 14), (8, 20)])
def test_dualpipe_phase_counts(N, C):
    """Report §3.2.1's DualPipe: K F and K B per direction; Bi = W = 2H − h − 1; rank N−1−r is rank r mirrored;
    the middle ranks' first steady iteration is F then a full B, not overlapped."""
    H = N // 2
    for r in range(N):
        ops = schedule("dualpipe", r, N, C)
        h = min(r, N - 1 - r)
        kinds = Counter(p.kind for p in _parts(ops))
        assert kinds["F"] == C and kinds["B"] + kinds["Bi"] == C
        assert kinds["Bi"] == kinds["W"] == 2 * H - h - 1
        first_fb = next(i for i, op in enumerate(ops) if op.kind == "FB")
        if h == H - 1:
            assert ops[first_fb - 2].kind == "F" and ops[first_fb - 1].kind == "B"
        mirror = schedule("dualpipe", N - 1 - r, N, C)
        shape = lambda o: (o.kind, tuple(p.kind for p in o.parts()), tuple(p.mb % (C // 2) for p in o.parts()))
        assert [shape(o) for o in ops] == [shape(o) for o in mirror]
    # rank 0's opening for N=4, C=8 spelled out from DualPipe's eight phases
    got = [repr(o) for o in schedule("dualpipe", 0, 4, 8)[:9]]
    assert got == ["F0.0", "F0.1", "F0.2", "F7.4", "Bi7.4", "W7.4", "F7.5", "FB(F0.3&B7.5)", "FB(F7.6&B0.0)"]


def test_dualpipev_is_first_half_of_dualpipe_on_2n_ranks():
    N, C = 3, 7
    for r in range(N):
        v = schedule("dualpipev", r, N, C)
        d = schedule("dualpipe", r, 2 * N, 2 * C)
        flat = lambda ops: [(p.kind, p.mb % C) for p in _parts(ops)]
        assert flat(v) == flat(d)
        assert {p.stage for p in _parts(v)} == {r, 2 * N - 1 - r}


@pytest.mark.parametrize("kind,N,C,msg", [("dualpipe", 3, 6, "even number"), ("dualpipe", 4, 6, "num_chunks"),
                                          ("dualpipe", 4, 9, "even num_chunks"), ("dualpipev", 2, 3, r">= 2\*num_ranks = 4"),
                                          ("1f1b", 4, 3, "num_chunks >= num_ranks"), ("gpipe", 2, 2, "unknown")])
def test_invalid_arguments_raise_clear_errors(kind, N, C, msg):
    with pytest.raises(ValueError, match=msg):
        schedule(kind, 0, N, C)
