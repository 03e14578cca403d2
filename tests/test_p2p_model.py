"""Every pipeline schedule's P2P traffic against a model of NCCL's matching (no tags; one FIFO per rank
pair for both directions; a send completes only with the peer's posted receive): no deadlock, and every
message lands in the receive meant for it — PP ∈ {2, 4, 8, 16}, chunk counts from the minimum to 3·PP.
The model itself is shown to catch a wrong order (negative controls)."""
import pytest

from parallel.p2p_model import ChannelCursor, NcclDeadlock, nccl_check, pair_orders
from parallel.schedules import _check, schedule

KINDS = ("1f1b", "zb1p", "dualpipe", "dualpipev")


def _chunk_counts(kind, N):
    valid = []
    for C in range(1, 3 * N + 1):
        try:
            _check(kind, 0, N, C)
        except ValueError:
            continue
        valid.append(C)
    # the minimum, the next valid counts, PP, 2·PP and the maximum: every regime of the schedule
    picks = set(valid[:3]) | {valid[-1]} | {c for c in valid if c in (N, 2 * N)}
    return sorted(picks) if N >= 8 else valid


def _messages(kind, N, C):
    return sorted(m.key for r in range(N) for op in schedule(kind, r, N, C) for m in op.sends)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("N", [2, 4, 8, 16])
def test_every_schedule_matches_under_nccl_rules(kind, N):
    for C in _chunk_counts(kind, N):
        delivered = nccl_check(kind, N, C)
        assert sorted(delivered) == _messages(kind, N, C), (kind, N, C)
        wrong = {k: v for k, v in delivered.items() if k != v}
        assert not wrong, (kind, N, C, wrong)


def test_orders_agree_between_the_two_ends_and_keep_each_senders_order():
    kind, N, C = "dualpipe", 8, 16
    orders = pair_orders(kind, N, C)
    for a in range(N):
        for b, calls in orders[a].items():
            mirror = [("recv" if k == "send" else "send", key) for k, key in orders[b][a]]
            assert calls == mirror
            sent_in_op_order = [m.key for op in schedule(kind, a, N, C) for m in op.sends if m.peer == b]
            assert [key for k, key in calls if k == "send"] == sent_in_op_order


def _run_with(orders_of, kind, N, C):
    import parallel.p2p_model as pm
    orig = pm.pair_orders
    pm.pair_orders = lambda *a: orders_of(orig(*a))
    try:
        return nccl_check(kind, N, C)
    finally:
        pm.pair_orders = orig


def test_model_catches_swapped_receives():
    """Receiver posts two receives from one peer in the wrong order: same shapes, wrong buffers."""
    def swap(orders):
        calls = orders[1][0]
        i = next(i for i in range(len(calls) - 1) if calls[i][0] == calls[i + 1][0] == "recv")
        calls[i], calls[i + 1] = calls[i + 1], calls[i]
        return orders
    try:
        delivered = _run_with(swap, "1f1b", 2, 4)
    except NcclDeadlock:
        return
    assert any(k != v for k, v in delivered.items()), "the swapped receives went unnoticed"


def test_model_catches_per_direction_orders_that_deadlock():
    """Each rank issuing all its sends to a peer before its receives (a per-direction order, fine
    where sends buffer) deadlocks under rendezvous: both heads are sends."""
    def sends_first(orders):
        return [{p: sorted(calls, key=lambda c: c[0] != "send") for p, calls in o.items()} for o in orders]
    with pytest.raises((NcclDeadlock, RuntimeError)):
        _run_with(sends_first, "dualpipe", 4, 8)


def test_cursor_refuses_a_send_out_of_order():
    cur = ChannelCursor({1: [("send", ("act", 0, 1, 0)), ("send", ("act", 0, 1, 1))]})
    with pytest.raises(RuntimeError, match="out of the channel order"):
        cur.sent(1, ("act", 0, 1, 1))
