"""The overlapped F&B's communication stream (parallel/comm_streams.py; issue 17 D), checked on the CPU.

``CudaCommStreams`` makes its CUDA calls through ``CudaOps``; here ``StreamModel`` stands in for them and
models what a GPU would do with the calls it gets: each stream a FIFO with a vector clock, an event a
snapshot of its stream's clock, ``wait_event`` a merge. A TorchDispatchMode, entered on the main thread
and on the two-hop communication thread, puts every aten op (the gloo collectives included: they are
``c10d`` ops) on its thread's current stream, and checks, as a race detector would:

- ordering: an op reading a tensor last written on another stream must be ordered after that write through
  events (so a consumer of a communication output waited on an event recorded after the communication,
  and the communication waited for the compute that produced its input);
- memory: an op reading a tensor allocated on another stream must follow ``record_stream`` of that tensor
  to its own stream (else the caching allocator could hand the block out again while this stream reads it).

Host syncs (``.item()``, ``.tolist()``, ``.cpu()``, ``bool(t)``...) issued by the main thread are counted
by a TorchFunctionMode; the model has no ``synchronize`` (a call would fail the run).

On 2 gloo ranks, for the flat and the two-hop (2 chunks, its hops on the comm thread) dispatchers, a paired
F&B of two MoE layers (``tests/test_overlap.py``'s stage) runs with the modelled streams: no finding, every
all-to-all on the communication stream (on both threads), loss and gradients bitwise those of the plain
module. Negative controls drop one kind of call the seam makes (the comm stream's wait on compute, the
compute stream's wait on the comm event, ``record_stream``) and the checker must report it.
"""
from __future__ import annotations

import collections
import contextlib
import os
import threading
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from parallel.comm_streams import CudaOps
from tests.conftest import tiny_cfg
from tests.dist_utils import run_ranks
from tests.test_overlap import _microbatches

SYNCS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"}


class _Stream:
    def __init__(self, name: str):
        self.name, self.clock = name, {name: 0}


class _Event:
    def __init__(self, clock: dict):
        self.clock = dict(clock)


def _key(t: torch.Tensor):
    return t.untyped_storage().data_ptr() if t.numel() else None


class StreamModel(CudaOps):
    """``CudaOps`` as a GPU would carry them out, with ordering and memory checks (module docstring).
    ``drop``: one kind of call to ignore (a negative control): "comm_wait" (the comm stream's waits),
    "compute_wait" (the compute stream's waits), "record_stream"."""

    def __init__(self, drop: str = ""):
        self.drop, self.compute, self.local, self.lock = drop, _Stream("compute"), threading.local(), threading.RLock()
        self.writer: dict = {}                  # storage -> (stream, tick) of its last write
        self.alloc: dict = {}                   # storage -> stream it was allocated on
        self.recorded = collections.defaultdict(set)   # storage -> streams given by record_stream
        self.keep: list = []                    # every storage made while watching: no address is reused
        self.races: list = []
        self.unrecorded: list = []
        self.a2a = collections.Counter()        # (thread, stream) of each c10d all-to-all
        self.syncs = collections.Counter()      # main thread's host syncs: (name, site)

    # ---------------------------------------------------------------- CudaOps
    def new_stream(self, device):
        return _Stream("comm")

    def current(self, device=None):
        return getattr(self.local, "stream", self.compute)

    @contextlib.contextmanager
    def use(self, stream):
        prev = self.current()
        self.local.stream = stream
        try:
            yield
        finally:
            self.local.stream = prev

    def record_event(self, stream):
        with self.lock:
            return _Event(stream.clock)

    def wait_event(self, stream, event) -> None:
        if self.drop == f"{stream.name}_wait":
            return
        with self.lock:
            for s, tick in event.clock.items():
                stream.clock[s] = max(stream.clock.get(s, 0), tick)

    def record_stream(self, t, stream) -> None:
        if self.drop != "record_stream" and _key(t) is not None:
            with self.lock:
                self.recorded[_key(t)].add(stream.name)

    # ---------------------------------------------------------------- the op hook
    def on_op(self, func, args, kwargs, out) -> None:
        s = self.current()
        schema = func._schema
        with self.lock:
            s.clock[s.name] += 1
            tick = s.clock[s.name]
            written = []
            for a, arg in zip(schema.arguments, args):
                for t in (x for x in tree_leaves(arg) if isinstance(x, torch.Tensor)):
                    k = _key(t)
                    if k is None:
                        continue
                    w = self.writer.get(k)
                    if w is not None and w[0] != s.name and s.clock.get(w[0], 0) < w[1]:
                        self.races.append((str(func), s.name, w))
                    if self.alloc.get(k, s.name) != s.name and s.name not in self.recorded[k]:
                        self.unrecorded.append((str(func), s.name, self.alloc[k]))
                    if a.alias_info is not None and a.alias_info.is_write:
                        written.append(k)
            for k in written:
                self.writer[k] = (s.name, tick)
            fresh = [r.alias_info is None for r in schema.returns]
            outs = out if isinstance(out, (tuple, list)) and len(schema.returns) > 1 else [out]
            for is_new, o in zip(fresh, outs):
                for t in (x for x in tree_leaves(o) if isinstance(x, torch.Tensor)):
                    if is_new and _key(t) is not None:
                        self.alloc[_key(t)], self.writer[_key(t)] = s.name, (s.name, tick)
                        self.keep.append(t.untyped_storage())
            if func.namespace == "c10d" and "alltoall" in func.__name__:
                self.a2a[(threading.current_thread().name, s.name)] += 1

    @contextlib.contextmanager
    def watching(self):
        """Checks every op of the main thread and of the two-hop communication thread meanwhile."""
        from parallel.two_hop_chunks import comm_thread
        modes = [_Ops(self), _Ops(self)]
        modes[0].__enter__()
        comm_thread().submit(modes[1].__enter__).result()
        try:
            with _Syncs(self):
                yield self
        finally:
            comm_thread().submit(modes[1].__exit__, None, None, None).result()
            modes[0].__exit__(None, None, None)


class _Ops(TorchDispatchMode):
    def __init__(self, model: StreamModel):
        super().__init__()
        self.model = model

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.model.on_op(func, args, kwargs or {}, out)
        return out


class _Syncs(TorchFunctionMode):
    def __init__(self, model: StreamModel):
        super().__init__()
        self.model = model

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in SYNCS:
            fr = next(f for f in reversed(traceback.extract_stack()[:-1]) if f"{os.sep}torch{os.sep}" not in f.filename)
            self.model.syncs[(name, f"{os.path.basename(fr.filename)}:{fr.name}")] += 1
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------ the paired op
KINDS = {"flat": [], "two_hop": ["parallel.nodes=2", "parallel.ranks_per_node=1", "parallel.a2a_chunks=2"]}
CONTROLS = ("", "comm_wait", "compute_wait", "record_stream")


def _worker(rank, world):
    from dsv3.model.transformer import Transformer
    from parallel.comm_streams import CudaCommStreams
    from parallel.dsv3_stages import DSV3Stage
    from parallel.expert_parallel import apply_expert_parallel
    from parallel.mesh import Mesh
    from parallel.overlap import drain, run_pair, stage_backward, stage_forward
    from parallel.trace import Tracer
    tr = Tracer(enabled=False)
    out = {}
    for kind, overrides in KINDS.items():
        cfg = tiny_cfg("model.n_dense_layers=0", "parallel.ep=2", *overrides)
        torch.manual_seed(0)
        model = Transformer(cfg.model)
        model.train()
        apply_expert_parallel(model, Mesh.from_config(cfg.parallel), cfg.parallel, kind=kind)
        assert {m.dispatcher.kind for m in model.layers.modules() if hasattr(m, "dispatcher")} == {kind}
        stage = DSV3Stage(model, 0, 2, True, True)
        mb_f, mb_b = _microbatches(2, 10 + rank)
        params = [p for p in model.parameters() if p.requires_grad]

        def take_grads():
            g = [p.grad.clone() for p in params]
            for p in params:
                p.grad = None
            return g

        loss_b = stage(None, mb_b)             # the plain module: B's forward, A's forward, B's backward
        loss_f = stage(None, mb_f)
        loss_b.backward()
        ref = (loss_f.detach(), take_grads())
        for drop in CONTROLS if kind == "flat" else CONTROLS[:1]:
            sm = StreamModel(drop)
            streams = CudaCommStreams(torch.device("cpu"), sm)
            with sm.watching():
                _, record_b = drain(stage_forward(stage, None, mb_b, tr, streams))
                (y, _), _ = run_pair(stage_forward(stage, None, mb_f, tr, streams),
                                     stage_backward(record_b, None, tr, streams=streams), tr, 0, 1, True)
            out[(kind, drop)] = dict(
                races=len(sm.races), unrecorded=len(sm.unrecorded), race_example=sm.races[:1],
                unrecorded_example=sm.unrecorded[:1], a2a=dict(sm.a2a), syncs=dict(sm.syncs),
                loss_equal=bool(torch.equal(y.detach(), ref[0])),
                grads_equal=all(torch.equal(a, b) for a, b in zip(take_grads(), ref[1])))
    return out


def _sites(syncs: dict) -> collections.Counter:
    out = collections.Counter()
    for (_, site), n in syncs.items():
        out[site] += n
    return out


def test_all_to_alls_on_the_comm_stream_ordered_by_events():
    """Per MoE layer a pair issues 4 routes of the forward (dispatch, combine of each micro-batch) and 2 of
    the backward; flat: one all-to-all each plus the dispatch's count exchange; two-hop with C = 2 chunks:
    2·C on the comm thread each, the count exchange on the main thread."""
    layers, mbs, C = 2, 2, 2
    results = run_ranks(_worker, 2, timeout=180)
    for rank, res in enumerate(results):
        for kind in KINDS:
            r = res[(kind, "")]
            assert r["races"] == 0 and r["unrecorded"] == 0, (rank, kind, r)
            assert r["loss_equal"] and r["grads_equal"], (rank, kind)
            dispatches = layers * mbs
            if kind == "flat":
                assert r["a2a"] == {("MainThread", "comm"): layers * 6 + dispatches}, r["a2a"]
            else:
                assert r["a2a"] == {("MainThread", "comm"): dispatches, ("ep-comm", "comm"): layers * 6 * 2 * C}, r["a2a"]
            # host syncs of the main thread: none in the overlap, the stream seam or the stage's loss
            # bookkeeping (its parts stay device tensors until the step reads them once); only the
            # dispatch's split sizes (2 per flat dispatch: its plan and the count exchange; 3 per two-hop one)
            sites = _sites(r["syncs"])
            if kind == "flat":
                assert sites == {"all_to_all.py:dispatch": dispatches, "all_to_all.py:exchange_counts": dispatches}
            else:
                assert sites == {"two_hop_chunks.py:plan_dispatch": 2 * dispatches,
                                 "all_to_all.py:exchange_counts": dispatches}
        # each dropped call is caught: a read racing the write it needed, or a block another stream reads
        # without record_stream
        for drop in CONTROLS[1:]:
            r = res[("flat", drop)]
            assert r["loss_equal"] and r["grads_equal"]     # the CPU computes the same; a GPU would not
            if drop == "record_stream":
                assert r["unrecorded"] > 0 and r["races"] == 0, (drop, r)
            else:
                assert r["races"] > 0, (drop, r)
