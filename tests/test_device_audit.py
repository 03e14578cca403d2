"""Every collective's tensors on the model's device (issue 17 B, items 2 and 3), checked on the CPU.

Under a plain NCCL group a collective given a host tensor stops the run; on this CPU machine the host is
the model's device, so the paths run under ``parallel.device_audit.DeviceAudit``: a TorchFunctionMode
that tracks which tensors a GPU run would hold on the host (made without ``device=`` from no tensor,
``.cpu()``, and what is computed from those only) while every torch.distributed collective and P2P
entry point checks its tensor arguments, and ops mixing host and device tensors are reported as CUDA
would reject them. One launch of 4 gloo ranks runs, each under the audit:

- ZeRO-1 × EP 2 (flat all-to-all) over DP 4: a training step and ``all_layer_loads``;
- DualPipe PP 2 × DP 2 × EP 2 (the overlapped pipeline, two-hop all-to-all on its comm thread,
  mirrored stages whose ZeRO shards are summed over the copies): a training step, ``all_layer_loads``,
  the training loop's balance fields under a pipeline (``PipelineBalance.step_fields``, once a step) and
  a sharded checkpoint saved and loaded back (per-rank RNG state restored).

Clean runs must give no finding (and the audit must not change the numbers: the audited step's loss
equals the unaudited one's bit for bit). Negative controls revert one fixed call site each, through
a patch of that module's ``torch`` that drops ``device=`` from one factory in one function (as the
code read before the fix), and the audit must report that site: ZeRO's norm squares, the loss sums and
``all_layer_loads`` of parallelize, the flat all-to-all's combine buffer, the two-hop relay's sum
buffer (on the comm thread), the checkpoint's copy-sum buffer. Each control also asserts that the
patched call was really made.

The trainer itself: ``dsv3.train.train`` (set-up, ``parallelize()``, the loop ``run_loop`` for TRAIN_STEPS steps,
its stop agreement and histogram reductions, the final eval and sharded save) runs whole under the audit
on the 4 ranks (ZeRO-1 × EP 2), with no finding; one more run reverts the loop's own device choices, each
of which the audit must name at its site: the stop agreement's flag (``StopRequests.agreed``, all-reduced
after every step: a host tensor in a collective) and the balance monitor's histograms (added to on the
device every micro-batch).
And the audit's known false positive is gone: ``fp8_to_float``'s host lookup table (``CPU_BRANCHES``).
"""
from __future__ import annotations

import functools
import os
import sys

import torch

from tests.conftest import config_path
from tests.dist_utils import run_ranks

WORLD, SEQ, ROWS = 4, 16, 8
BASE = [f"data.seq_len={SEQ}", "train.micro_batch_size=1", f"train.global_batch={ROWS}"]
LAYOUTS = {
    "zero_ep": ["parallel.ep=2", "parallel.dispatcher=flat"],
    "dualpipe_ep": ["parallel.pp=2", "parallel.ep=2", "parallel.pp_schedule=dualpipe",   # EP over 2 "nodes":
                    "parallel.nodes=4", "parallel.ranks_per_node=1"],                    # the two-hop path
}
# (layout, module, factory, function whose call loses device=, what runs, file:function the audit must name)
REVERTS = {
    "zero_norm_squares": ("zero_ep", "parallel.zero", "zeros", "step", "step", "parallel/zero.py"),
    "loss_sums": ("zero_ep", "parallel.parallelize", "zeros", "train_step", "step", "parallel/parallelize.py"),
    "all_layer_loads": ("zero_ep", "parallel.parallelize", "zeros", "all_layer_loads", "loads",
                        "parallel/parallelize.py"),
    "a2a_combine_buffer": ("zero_ep", "parallel.all_to_all", "zeros", "finish", "step", "parallel/all_to_all.py"),
    "two_hop_relay_sum": ("dualpipe_ep", "parallel.two_hop_chunks", "zeros", "reverse_task", "step",   # comm thread
                          "parallel/two_hop_chunks.py"),
    "ckpt_copy_sum": ("dualpipe_ep", "parallel.dist_checkpoint", "zeros", "_install", "load",
                      "parallel/dist_checkpoint.py"),
}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_STEPS = 1
TRAIN = ["model.n_layers=2", "train.loss_curve=false", "data.seq_len=16", "train.micro_batch_size=1", "train.global_batch=4", f"train.steps={TRAIN_STEPS}",
         "train.warmup_steps=1", "train.sample_tokens=0", "train.eval_batches=1", "parallel.backend=gloo",
         "parallel.ep=2", "parallel.dispatcher=flat", f"data.cache_dir={os.path.join(ROOT, '.cache', 'dsv3')}"]
# the training loop's device choices, reverted: (module, factory, function, what the audit must name)
LOOP_REVERTS = {
    "stop_agreement": ("dsv3.training.stops", "tensor", "agreed", "dsv3/training/stops.py"),
    "balance_histograms": ("dsv3.training.balance_metrics", "zeros", "__init__", "dsv3/training/balance_metrics.py"),
}


class _Reverted:
    """A module's ``torch`` with one call site reverted: ``torch.<factory>(...)`` called from the
    function named ``caller`` loses its ``device=``; ``hits`` counts the calls so changed."""

    def __init__(self, factory: str, caller: str):
        self.factory, self.caller, self.hits = factory, caller, 0

    def __getattr__(self, name):
        real = getattr(torch, name)
        if name != self.factory:
            return real

        def reverted(*args, **kwargs):
            frame = sys._getframe(1)
            while frame.f_code.co_name in ("<listcomp>", "<genexpr>", "<dictcomp>"):   # inside the caller
                frame = frame.f_back
            if frame.f_code.co_name == self.caller and "device" in kwargs:
                kwargs.pop("device")
                self.hits += 1
            return real(*args, **kwargs)
        return reverted


def _build(overrides):
    from dsv3.config import load_config
    from dsv3.model.transformer import Transformer
    from parallel.mesh import Mesh
    from parallel.parallelize import parallelize
    cfg = load_config(config_path("debug.yaml"), BASE + overrides)
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    model.train()
    batch = torch.randint(0, cfg.model.vocab_size, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(1))
    pm = parallelize(model, Mesh.from_config(cfg.parallel), cfg)
    rows = ROWS // pm.dp
    return cfg, model, pm, batch[pm.dp_index * rows:(pm.dp_index + 1) * rows]


def _worker(rank, world, tmp):
    import importlib

    from parallel.device_audit import DeviceAudit
    from parallel.dist_checkpoint import load_sharded, save_sharded
    from parallel.pipeline_eval import PipelineBalance
    out = {}
    for name, overrides in LAYOUTS.items():
        cfg, model, pm, rows = _build(overrides)
        device = next(iter(pm.params.values())).device
        run_dir = f"{tmp}/{name}"

        def actions(what):
            if what == "step":
                return pm.train_step(rows, cfg.train.lr, model.mtp_weight)["loss"]
            if what == "loads":
                return pm.all_layer_loads(stats["loads"])
            if what == "save":
                return save_sharded(run_dir, 1, pm, dict(tokens=0, sampler={}))
            return load_sharded(path, pm)

        if name == "zero_ep":   # the audit is transparent: an unaudited twin's first loss, bit for bit
            *_, twin, twin_rows = _build(overrides)
            out["unaudited_loss"] = twin.train_step(twin_rows, cfg.train.lr, model.mtp_weight)["loss"]
        audit = DeviceAudit(device)
        meta = {}
        with audit:
            monitor = PipelineBalance(pm) if name == "dualpipe_ep" else None   # the loop's monitor under PP
            stats = pm.train_step(rows, cfg.train.lr, model.mtp_weight)
            loads = actions("loads")
            if monitor is not None:
                out["balance_fields"] = sorted(monitor.step_fields(loads))   # the loop's per-step fields
            if name == "dualpipe_ep":   # DCP is slow on 2 cores: the checkpoint on one layout only
                torch.rand(rank + 1)          # each rank's generator at its own place
                path = actions("save")
                after_save = torch.rand(3)    # what each rank's generator gives right after the save
                torch.rand(50)
                meta = actions("load")
                out["rng"] = (after_save, torch.rand(3))
        out[name] = dict(findings=audit.findings, calls=dict(audit.calls), loss=stats["loss"],
                         rng_restored=meta.get("rng_restored"))
        for revert, (layout, module, factory, caller, what, _) in REVERTS.items():
            if layout != name:
                continue
            mod = importlib.import_module(module)
            patched = _Reverted(factory, caller)
            audit = DeviceAudit(device)
            saved, mod.torch = mod.torch, patched
            try:
                with audit:
                    actions(what)
            finally:
                mod.torch = saved
            out[revert] = dict(findings=audit.findings, hits=patched.hits)
    out.update(_train_under_audit(tmp, device))
    return out


def _train_under_audit(tmp, device):
    """``dsv3.train.train`` whole under the audit; then again with every ``LOOP_REVERTS`` entry reverted
    (each in its own module, so each finding names its own site)."""
    import importlib

    from dsv3.config import load_config
    from dsv3.train import train
    from parallel.device_audit import DeviceAudit
    from parallel.steps import ParallelSteps
    out = {}
    for name in ("train", "reverted"):
        cfg = load_config(config_path("debug.yaml"), TRAIN + [f"train.out_dir={tmp}/{name}"])
        audit, patched = DeviceAudit(device), {}
        if name == "reverted":   # the save is audited in the clean run: skipped here (DCP is slow on 2 cores)
            patched["save"] = (ParallelSteps, ParallelSteps.save, lambda *a: None)
            ParallelSteps.save = patched["save"][2]
            for revert, (module, factory, caller, _) in LOOP_REVERTS.items():
                mod = importlib.import_module(module)
                patched[revert] = (mod, mod.torch, _Reverted(factory, caller))
                mod.torch = patched[revert][2]
        try:
            with audit:
                losses = train(cfg)["losses"]
        finally:
            if "save" in patched:
                ParallelSteps.save = patched.pop("save")[1]
            for mod, saved, _ in patched.values():
                mod.torch = saved
        out[name] = dict(findings=audit.findings, call_sites=dict(audit.call_sites), losses=losses,
                         hits={revert: p.hits for revert, (*_, p) in patched.items()})
    return out


@functools.lru_cache(maxsize=1)
def _results(tmp: str):
    return run_ranks(_worker, WORLD, tmp, timeout=300)


def _run(tmp_path_factory):
    return _results(str(tmp_path_factory.getbasetemp() / "device_audit"))


def test_zero_ep_and_pipeline_paths_pass_the_audit(tmp_path_factory):
    results = _run(tmp_path_factory)
    for rank, res in enumerate(results):
        for name in LAYOUTS:
            r = res[name]
            assert r["findings"] == [], (rank, name, r["findings"])
            calls = r["calls"]
            # ZeRO-1's reduce-scatter and all-gather, the loss / norm / load all-reduces and the expert
            # all-to-all all ran under the audit
            for entry in ("reduce_scatter", "all_gather", "all_reduce", "all_to_all_single"):
                assert calls.get(entry, 0) > 0, (rank, name, entry, calls)
        pipe = res["dualpipe_ep"]
        assert {"bias", "groups_per_token", "maxvio_accum"} <= set(res["balance_fields"]), res["balance_fields"]
        assert pipe["calls"].get("isend", 0) + pipe["calls"].get("batch_isend_irecv", 0) > 0, pipe["calls"]
        assert pipe["calls"].get("all_gather_object", 0) > 0 and pipe["rng_restored"] is True, (rank, pipe)
        after_save, after_load = res["rng"]   # the sharded checkpoint restored this rank's own RNG stream
        assert torch.equal(after_save, after_load), rank
        assert res["unaudited_loss"] == res["zero_ep"]["loss"], (rank, res["unaudited_loss"], res["zero_ep"]["loss"])
    assert len({tuple(res["rng"][0].tolist()) for res in results}) == WORLD   # one stream per rank


def test_the_trainer_passes_the_audit(tmp_path_factory):
    """``train()`` through ``parallelize()``: every step ran, no finding, and the loop's own collectives were
    among those checked — the stop agreement after each step, the histogram reduction of each step."""
    results = _run(tmp_path_factory)
    for rank, res in enumerate(results):
        r = res["train"]
        assert r["findings"] == [], (rank, r["findings"])
        assert len(r["losses"]) == TRAIN_STEPS
        called = r["call_sites"]
        stops = sum(n for site, n in called.items() if site.startswith("dsv3/training/stops.py") and "(agreed)" in site)
        reduces = sum(n for site, n in called.items() if site.startswith("dsv3/training/loop.py") and "(all_reduce_)" in site)
        assert stops == TRAIN_STEPS, called
        assert reduces >= TRAIN_STEPS, called     # at least the histograms, once a step


def test_reverting_a_loop_call_site_is_caught(tmp_path_factory):
    results = _run(tmp_path_factory)
    for rank, res in enumerate(results):
        r = res["reverted"]
        for revert, (*_, where) in LOOP_REVERTS.items():
            assert r["hits"][revert] > 0, (revert, rank, "the reverted call never ran")
            assert any(where in site for _, site, _ in r["findings"]), (revert, rank, r["findings"])
        # the stop flag: a host tensor handed to the all-reduce itself
        assert any(kind == "collective" and "dsv3/training/stops.py" in site for kind, site, _ in r["findings"]), r["findings"]


def test_cpu_branch_lookup_table_is_not_a_finding(monkeypatch):
    """``quant_ref.fp8_to_float`` decodes CPU inputs through a table made at import; imported inside an
    audit the table is a host tensor, and its CPU branch (never taken on a GPU) mixed it with the device
    input. The same op outside that function is still reported."""
    from parallel.device_audit import DeviceAudit
    from triton_kernels import quant_ref
    x = (torch.randn(8, 16) * 100).to(quant_ref.FP8_DTYPE)   # made before the audit: the model's device
    audit = DeviceAudit(torch.device("cpu"))
    with audit:
        table = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(quant_ref.FP8_DTYPE).float()
        monkeypatch.setattr(quant_ref, "_FP8_VALUES", table)
        y = quant_ref.fp8_to_float(x)
        assert audit.findings == []
        torch.take(table, x.view(torch.uint8).long())
    assert torch.equal(y, x.float())
    assert [(kind, site.split(":")[0]) for kind, site, _ in audit.findings] == [("mixed", "tests/test_device_audit.py")]


def test_reverting_a_fixed_call_site_is_caught(tmp_path_factory):
    results = _run(tmp_path_factory)
    for revert, (*_, where) in REVERTS.items():
        for rank, res in enumerate(results):
            r = res[revert]
            assert r["hits"] > 0, (revert, rank, "the reverted call never ran")
            sites = [site for _, site, _ in r["findings"]]
            assert any(where in site for site in sites), (revert, rank, r["findings"])
