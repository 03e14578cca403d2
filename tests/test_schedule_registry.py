"""A pipeline schedule kind added from this module alone (parallel/schedules.register_schedule), run through
everything that reads the registry: the op-list checks of tests/test_schedules.py and the NCCL matching
model, the simulator against the kind's own bubble formula and in-flight count, config validation, the
planner, and a 2-rank gloo pipeline against one process with tests/test_pipeline.py's bounds.

The kind: GPipe's fill-drain order (Huang et al. 2019) with the backward split as in zero-bubble
pipelining (Qi et al. 2023): every forward, then every input-grad backward Bi, then every queued weight
grad W. Rank 0 waits N−1 forwards for the fill and N−1 input-grad hops for the drain, so its bubble is
(PP−1)(F + Bi) = (PP−1)(F + B − W) with B = Bi + W, and each rank holds all C micro-batches' activations."""
import os

import pytest

from parallel.schedules import Layout, Schedule, get_schedule, register_schedule, unregister_schedule

NAME = "fill_drain"


def _line(N: int) -> Layout:
    return Layout(NAME, N, N, tuple(range(N)), tuple(range(N)), (tuple(range(N)),))


def _ops(rank: int, N: int, C: int) -> list:
    return ([("F", rank, m) for m in range(C)] + [("Bi", rank, m) for m in range(C)]
            + [("W", rank, m) for m in range(C)])


def _bubble(PP: int, F: float, B: float, W: float, FB: float) -> float:
    return (PP - 1) * (F + B - W)


FILL_DRAIN = Schedule(NAME, "fill-drain", _line, _ops, _bubble,
                      in_flight=lambda num_stages, stage, num_chunks: num_chunks)


def _register() -> None:
    register_schedule(FILL_DRAIN)


@pytest.fixture
def fill_drain():
    _register()
    try:
        yield FILL_DRAIN
    finally:
        unregister_schedule(NAME)


def test_registry_refuses_a_second_name_a_wrong_layout_and_unknown_names(fill_drain):
    import dataclasses
    with pytest.raises(ValueError, match=f"'{NAME}' is already registered"):
        register_schedule(FILL_DRAIN)
    v_claim = dataclasses.replace(FILL_DRAIN, name="fill_drain_v", model_stages_per_rank=2)
    with pytest.raises(ValueError, match="layout on 2 ranks has kind 'fill_drain', 2 model stages"):
        register_schedule(v_claim)
    with pytest.raises(ValueError, match=f"unknown pipeline schedule 'fill_drain_v'; choose one of .*{NAME}"):
        get_schedule("fill_drain_v")


@pytest.mark.parametrize("N,C", [(1, 1), (2, 2), (4, 4), (4, 9)])
def test_op_lists_are_a_valid_schedule(fill_drain, N, C):
    from parallel.p2p_model import nccl_check
    from tests import test_p2p_model as TPM, test_schedules as TS
    TS.test_every_stage_runs_f_then_b_then_w_once(NAME, N, C)
    TS.test_sends_match_receives_in_order(NAME, N, C)
    delivered = nccl_check(NAME, N, C)        # deadlock-free under NCCL's matching, each message where meant
    assert sorted(delivered) == TPM._messages(NAME, N, C) and all(k == v for k, v in delivered.items())
    assert len(delivered) == 2 * C * (N - 1)  # an activation and a gradient per micro-batch per hop
    with pytest.raises(ValueError, match=f"fill-drain needs num_chunks >= num_ranks = {N}"):
        get_schedule(NAME).check(0, N, N - 1)


@pytest.mark.parametrize("N,C", [(2, 2), (4, 4), (4, 12), (8, 8)])
@pytest.mark.parametrize("costs", [(1, 2, 1, 1), (1.0, 3.0, 2.0, 1.0)], ids=["unit", "bi2"])
def test_simulated_bubble_and_memory_match_the_kinds_formulas(fill_drain, N, C, costs):
    from parallel.simulate import Costs, closed_form_bubble, published_memory, simulate
    F, B, Bi, W = costs            # B = Bi + W: the formula's B is the full backward
    res = simulate(NAME, N, C, Costs(F=F, B=B, Bi=Bi, W=W))
    assert res.busy == [C * (F + Bi + W)] * N
    assert res.bubble == [(N - 1) * (F + Bi)] * N                     # by hand, module docstring
    assert res.bubble == [closed_form_bubble(NAME, N, res.costs)] * N
    assert res.peak_activations == fill_drain.peak_activations(N, C) == [C] * N
    assert published_memory(NAME, N, C) == (1, C) and res.param_copies == [1] * N


def test_config_accepts_the_name_and_still_rejects_unknown_ones(fill_drain):
    from dsv3.config import ConfigError, load_config
    from tests.conftest import config_path
    cfg = load_config(config_path("debug.yaml"), ["parallel.pp=2", f"parallel.pp_schedule={NAME}"])
    assert cfg.parallel.pp_schedule == NAME
    with pytest.raises(ConfigError, match=rf"^parallel\.pp_schedule: expected one of .*'{NAME}', got 'gpipe2'"):
        load_config(config_path("debug.yaml"), ["parallel.pp=2", "parallel.pp_schedule=gpipe2"])
    # the kind's rule on micro-batches: pp=4 needs >= 4 per step, debug's 16 sequences in 16s give 1
    with pytest.raises(ConfigError, match=f"{NAME} with pp=4 needs >= 4"):
        load_config(config_path("debug.yaml"), ["parallel.pp=4", f"parallel.pp_schedule={NAME}",
                                                "train.micro_batch_size=16"])


def test_planner_prices_the_kind(fill_drain, tmp_path, capsys):
    """The planner's bubble is the kind's formula at its own F, B, W; its activations are C micro-batches on
    every stage, against 1F1B's PP − s (the ratio is exact: the per-token bytes are the same)."""
    from dsv3.config import load_config
    from dsv3.tools.plan import ActDtypes, main, plan, rank_activation_bytes
    from tests.conftest import config_path
    cfg = load_config(config_path("debug.yaml"), ["parallel.pp=2", f"parallel.pp_schedule={NAME}"])
    p = plan(cfg, 2, "h800", 2, 1, 1)
    ex = p.expected
    assert ex["bubble"] == pytest.approx(_bubble(2, ex["F"], ex["B"], ex["W"], 0.0), rel=1e-12) and ex["bubble"] > 0
    C = cfg.train.global_batch // p.micro_batch
    dt = ActDtypes.for_training(cfg)
    mine = rank_activation_bytes(cfg, 2, NAME, p.micro_batch, dt, num_chunks=C)
    one_f_one_b = rank_activation_bytes(cfg, 2, "1f1b", p.micro_batch, dt, num_chunks=C)
    for r in range(2):
        assert mine[r] == pytest.approx(one_f_one_b[r] * C / (2 - r), rel=1e-12)
    assert p.activations == mine[p.memory_rank]
    # the command: a YAML naming the kind plans (exit 0); an unknown kind is one line and exit 2
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    for path, kind in ((good, NAME), (bad, "gpipe2")):
        path.write_text(f"base: {config_path('debug.yaml')}\nparallel: {{pp: 2, pp_schedule: {kind}}}\n")
    assert main([str(good), "--gpus", "2"]) == 0
    assert f"schedule {NAME}" in capsys.readouterr().out
    assert main([str(bad), "--gpus", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "parallel.pp_schedule: expected one of" in err and NAME in err


def _worker_with_fill_drain(*args):
    """tests/test_pipeline.py's rank worker in a spawned process, which registers the kind first."""
    from parallel.schedules import SCHEDULES
    from tests import test_pipeline as TP
    if NAME not in SCHEDULES:
        _register()
    TP._worker(*args)


def test_two_rank_pipeline_matches_one_process(fill_drain, tmp_path, monkeypatch):
    """tests/test_pipeline.py's criterion on 2 gloo ranks: losses bitwise in fp32, grads within 1e-13
    relative in fp64, copies equal, over two SGD steps."""
    from tests import test_pipeline as TP
    monkeypatch.setattr(TP, "_worker", _worker_with_fill_drain)
    TP.test_pipeline_matches_single_process(NAME, 2, 4, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["0.pt", "1.pt"]
