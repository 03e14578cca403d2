"""The pipeline executor with overlapped F&B chunks (report §3.2.1, Figure 4: overlapped chunks).

    pipe = OverlapPipeline(model, dsv3_stages(model, 2), "dualpipe", num_chunks=C, act_shape=..., act_dtype=...)
    losses = pipe.step(microbatches)

``parallelize()`` builds this executor for DualPipe and DualPipeV when ``parallel.ep > 1`` and
``parallel.overlap`` (the default). Every stage runs as the pieces of ``parallel.overlap``
(``DSV3Stage.begin_forward``): the FB ops interleave their forward and backward chunks, so one
micro-batch's all-to-all is in flight while the other micro-batch computes (1F1B and ZB1P have no FB
ops: see ``parallel.overlap.pair_1f1b`` for why pairing plain 1F1B's steady state does not pay).
``overlap=False`` runs the same parts F then B. Losses and gradients are bitwise those of the plain
``Pipeline`` on the same stages either way. On CUDA the split Blocks' all-to-alls run on this device's
communication stream (``parallel.comm_streams``; ``streams=`` substitutes another).
"""
from __future__ import annotations

from typing import Optional

import torch

from parallel.comm_streams import CommStreams, comm_streams
from parallel.overlap import drain, run_pair, stage_backward, stage_forward, trace_all_to_alls
from parallel.pipeline import Pipeline
from parallel.schedules import Op
from parallel.all_to_all import Transport
from parallel.trace import OP, P2P, Tracer


class _TracedRecv:
    def __init__(self, work, tr: Tracer, name: str, mb: int):
        self.work, self.tr, self.name, self.mb = work, tr, name, mb

    def wait(self, *args):
        with self.tr.context("", self.mb), self.tr.span(self.name, P2P):
            return self.work.wait(*args)


class OverlapPipeline(Pipeline):
    """``Pipeline`` whose stages run as pieces: FB ops interleave their forward and backward chunks
    (``overlap=True``) or run them F then B (``overlap=False``); B, Bi and W run the same parts unpaired
    (Bi queues every part's weight grad for its W). ``tracer`` records every part and blocking receive
    (and the all-to-alls: ``trace``)."""

    def __init__(self, model, stages, kind, num_chunks, *, overlap: bool = True, tracer: Optional[Tracer] = None,
                 streams: Optional[CommStreams] = None, **kw):
        super().__init__(model, stages, kind, num_chunks, **kw)
        self.overlap = overlap
        self.streams = streams if streams is not None else comm_streams(self.device)
        self.tracer = tracer if tracer is not None else Tracer(enabled=False)
        self._records: dict[int, tuple] = {}   # id(stage output) -> (output, parts record)

    def trace(self, tracer: Tracer, transport: Optional[Transport] = None) -> None:
        """Records every part, blocking receive and all-to-all of this rank's stages in ``tracer``; the
        all-to-alls go through ``transport`` (default: the production ``Transport``; the benchmarks pass a
        modelled link, ``parallel.sim.links.ModelledTransport``)."""
        self.tracer = tracer
        for module in self.stage_module.values():
            trace_all_to_alls(module, tracer, transport)

    def _keep(self, y: torch.Tensor, record: list) -> torch.Tensor:
        self._records[id(y)] = (y, record)
        return y

    def _chunk_forward(self, f: Op, x: Optional[torch.Tensor]):
        return stage_forward(self._module(f.stage), x, self.mbs[f.mb], self.tracer, self.streams)

    def _forward(self, f: Op) -> None:
        x = self._input(f)
        with self.tracer.context("F", f.mb):
            y, record = drain(self._chunk_forward(f, x))
        self._after_forward(f, x, self._keep(y, record))

    def _backward(self, b: Op) -> None:
        _, y, g = self._take_backward(b)
        _, record = self._records.pop(id(y))
        tr = self.tracer
        if b.kind == "B":
            with tr.context("B", b.mb):
                dx = drain(stage_backward(record, g, tr, streams=self.streams))
        else:
            queued: list = []
            with tr.context("B", b.mb):
                dx = drain(stage_backward(record, g, tr, lambda name, w: queued.append((name, w)), self.streams))

            def weight(mb: int = b.mb) -> None:
                with tr.context("W", mb):
                    for name, w in queued:
                        with tr.span(name):
                            w()
            self.wqueue.append((b.stage, b.mb, weight))
        self._after_backward(b, dx)

    def _forward_backward(self, op: Op) -> None:
        f, b = op.f, op.b
        x_f = self._input(f)
        _, y_b, g_b = self._take_backward(b)
        _, record = self._records.pop(id(y_b))
        b_gen = stage_backward(record, g_b, self.tracer, streams=self.streams)
        (y_f, f_record), dx = run_pair(self._chunk_forward(f, x_f), b_gen, self.tracer, f.mb, b.mb, self.overlap)
        self._after_forward(f, x_f, self._keep(y_f, f_record))
        self._after_backward(b, dx)

    def _run(self, op: Op) -> None:
        with self.tracer.context("", op.mb if op.kind != "FB" else op.f.mb), self.tracer.span(repr(op), OP):
            super()._run(op)

    def _irecv(self, m):
        work, buf = super()._irecv(m)
        return _TracedRecv(work, self.tracer, f"recv {m.what}", m.mb), buf

