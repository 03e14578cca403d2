"""Read-outs: the run's final line, the loss-curve figure (dsv3/tools/plots.py), the load maps' colour bar and
clipping note (dsv3/tools/ablate_report.py), the schedule PNG's legend and time axis (parallel/simulate.py)."""
import json

import pytest

from dsv3.tools.ablate_report import LOAD_LABEL, clip_note, load_colorbar
from dsv3.tools.plots import curve_series, figure, loss_curve, moving_average
from dsv3.training.train_log import final_line
from parallel.schedules import chain_mbs
from parallel.simulate import Costs, box_styles, direction, legend_entries, simulate, time_label


def test_final_line():
    # the numbers: entropy 6.0522 − loss 4.6430 = 1.4092 below the baseline
    assert final_line(4.6430, 6.0522) == ("validation loss 4.6430, unigram entropy 6.0522: the model is 1.4092 "
                                          "nats/token below the unigram baseline")
    assert final_line(6.5, 6.0).endswith("the model is 0.5000 nats/token above the unigram baseline")


def _write_metrics(path):
    rows = [dict(step=1, tokens=64, loss=6.4, lm_loss=6.0, lr=1e-4),
            dict(step=2, tokens=128, loss=5.4, lm_loss=5.0, lr=2e-4),
            dict(step=2, val_loss=5.5, domain_loads={}),
            dict(step=3, tokens=192, loss=9.9, lm_loss=9.0, lr=3e-4),      # replaced by the resumed run's step 3
            dict(step=3, tokens=192, loss=4.4, lm_loss=4.0, lr=3e-4),
            dict(step=4, tokens=256, loss=float("nan"), lm_loss=float("nan"), lr=3e-4, skipped=True),
            dict(step=5, tokens=320, loss=3.4, lm_loss=3.0, lr=1.5e-4),
            dict(step=5, val_loss=3.25, val_unigram_entropy=6.0522)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lm_lo')   # a line being written


def test_loss_curve_series_and_figure(tmp_path):
    metrics = tmp_path / "run" / "metrics.jsonl"
    metrics.parent.mkdir()
    _write_metrics(metrics)
    s = curve_series(str(metrics))
    assert s["train"] == ([1, 2, 3, 5], [6.0, 5.0, 4.0, 3.0])           # resumed step once, skipped step out
    assert s["val"] == ([2, 5], [5.5, 3.25])
    assert s["lr"] == ([1, 2, 3, 4, 5], [1e-4, 2e-4, 3e-4, 3e-4, 1.5e-4])
    assert s["entropy"] == 6.0522
    fig = figure(s, "run")
    ax, ax2 = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax2.get_ylabel()) == ("optimizer step", "loss (nats/token)",
                                                                    "learning rate")
    drawn = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines + ax2.lines}
    assert drawn["train LM loss (per step)"] == s["train"]
    assert drawn["validation loss"] == s["val"]
    assert drawn["learning rate (right axis)"] == s["lr"]
    assert drawn["validation unigram entropy 6.052 (baseline)"][1] == [6.0522, 6.0522]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["train LM loss (per step)", "validation loss", "validation unigram entropy 6.052 (baseline)",
                      "learning rate (right axis)"]
    out = loss_curve(str(metrics))
    assert out == str(tmp_path / "run" / "loss_curve.png")
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "run").glob("*.tmp.png"))


def test_moving_average():
    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.0, 1.5, 2.5, 3.5, 4.5]
    assert moving_average([4.0, 0.0, 2.0], 3) == [4.0, 2.0, 2.0]


def test_load_colour_bar_is_labelled_and_says_what_is_clipped():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [[0.5, 2.5, 1.0], [3.0, 0.0, 0.0]]
    assert clip_note(rows) == "2 of 6 cells above 2 drawn as 2 (largest 3.00)"
    assert clip_note([[0.0, 2.0], [1.0, 1.0]]) == ""       # 2.0 itself is on the scale
    for data, extend in ((rows, "max"), ([[1.0, 1.0]], "neither")):
        fig, ax = plt.subplots()
        im = ax.imshow(data, vmin=0, vmax=2)
        note = load_colorbar(fig, im, ax, data)
        assert note == clip_note(data)
        assert im.colorbar.ax.get_ylabel() == LOAD_LABEL and im.colorbar.extend == extend
        plt.close(fig)


@pytest.mark.parametrize("kind,N,C", [("dualpipe", 4, 8), ("dualpipev", 2, 5), ("zb1p", 4, 8), ("1f1b", 2, 4)])
def test_schedule_legend_explains_every_box(kind, N, C):
    res = simulate(kind, N, C, Costs(1, 2, 1, 1, 3))
    keys = [k for k, _ in legend_entries(res)]
    styles = box_styles(res)
    assert {k for k, _ in styles} == set(keys) - {"dir1"}      # every kind of box drawn has an entry, no extra
    assert ("dir1" in keys) == (kind in ("dualpipe", "dualpipev"))
    # the two directions, from the schedules' own micro-batch chains (parallel/schedules.chain_mbs)
    second = set(chain_mbs(kind, N, C)[1]) if kind == "dualpipe" else set()
    forwards = [p for tl in res.timeline for _, _, op in tl for p in op.parts() if p.kind == "F"]
    for p in forwards:
        if kind == "dualpipe":
            assert direction(res, p) == (p.mb in second)
    if kind == "dualpipev":   # every micro-batch goes down N stages and back up N stages
        for mb in range(C):
            assert sorted(direction(res, p) for p in forwards if p.mb == mb) == [0] * N + [1] * N
    label = dict(legend_entries(res)).get("dir1", "")
    if kind == "dualpipe":
        assert f"micro-batches {C // 2}–{C - 1} fed on rank {N - 1}" in label
    assert time_label(res, "ms") == "time (ms)"
    assert "forward" in time_label(res)
    assert "--unit" in time_label(simulate(kind, N, C, Costs(2.5, 5, 2.5, 2.5)))
