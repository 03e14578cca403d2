"""The overlapped F&B's communication stream (report §3.2.1: computation and all-to-all run concurrently;
issue 17 D). ``parallel.overlap`` issues every dispatch / combine (and their backward routes) through here:

    with streams.comm(x, idx, w):          # the comm stream first waits for the compute stream's work so far
        handle = moe.dispatch(x, idx, w)   #   (an event recorded on it, as DeepEP's ``previous_event``)
    ... the other micro-batch's compute is issued on the compute stream ...
    recv = streams.finish(handle)          # handle.wait() on the comm stream (no new wait on compute), then the
                                           #   compute stream waits on an event recorded after it
                                           #   (DeepEP's ``async_finish`` + ``current_stream_wait``)

So the transfer, its packing and its unpacking / sums stay off the compute stream (NCCL runs each
collective on its own internal stream, ordered after the stream current at issue — here the comm stream —
and ``work.wait()`` joins it back to the current one), and compute waits on the GPU for exactly the
transfer it consumes: no host synchronisation in the seam. Memory across streams (the caching allocator
reuses a freed block as soon as the stream it was allocated on is past it):
- a compute tensor the comm stream reads is named in ``comm(*inputs)``: ``record_stream(comm)`` keeps its
  block from being reused before the comm stream's use (views of it share the block; what the comm
  stream computes from it is allocated on the comm stream);
- every tensor ``finish`` returns (walked through lists and dataclasses: received rows, gate weights, the
  expert plan) gets ``record_stream(compute)``.
The two-hop dispatch runs its hops on a communication thread (``parallel.two_hop_chunks``), whose
current stream is thread-local: ``comm()`` queues the stream's enter and exit on that thread around the
closures submitted inside it (the thread runs them in order), and ``finish`` records its event only
after ``handle.wait()`` has seen the thread's part issued — so the event covers it.

On the CPU (and ``NO_STREAMS``) every method is a no-op: the same code, the same results. The CUDA calls
go through ``CudaOps`` so a test can run this very logic on the CPU against a model of streams and
events (tests/test_comm_streams.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import torch

from parallel.two_hop_chunks import comm_thread


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor in ``obj``: itself, list / tuple / dict items, dataclass fields (recursively)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in tensors_in(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in tensors_in(o)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [t for f in dataclasses.fields(obj) for t in tensors_in(getattr(obj, f.name))]
    return []


class CommStreams:
    """No communication stream (CPU): ``comm`` is an empty context, ``finish`` is ``handle.wait()``."""

    def comm(self, *inputs: Any, wait_compute: bool = True):
        return contextlib.nullcontext()

    def finish(self, handle):
        return handle.wait()


NO_STREAMS = CommStreams()


class CudaOps:
    """The CUDA calls ``CudaCommStreams`` makes, in one place."""

    def new_stream(self, device: torch.device):
        return torch.cuda.Stream(device)

    def current(self, device: torch.device):
        return torch.cuda.current_stream(device)

    def use(self, stream):
        return torch.cuda.stream(stream)

    def record_event(self, stream):
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait_event(self, stream, event) -> None:
        stream.wait_event(event)

    def record_stream(self, t: torch.Tensor, stream) -> None:
        t.record_stream(stream)


class CudaCommStreams(CommStreams):
    """One communication stream beside the device's compute stream (see the module docstring)."""

    def __init__(self, device: torch.device, ops: CudaOps | None = None):
        self.device, self.ops = torch.device(device), ops or CudaOps()
        self.stream = self.ops.new_stream(self.device)

    @contextlib.contextmanager
    def comm(self, *inputs: Any, wait_compute: bool = True):
        ops = self.ops
        if wait_compute:
            ops.wait_event(self.stream, ops.record_event(ops.current(self.device)))
        for t in tensors_in(inputs):
            ops.record_stream(t, self.stream)
        thread_ctx = ops.use(self.stream)
        comm_thread().submit(thread_ctx.__enter__)   # the comm thread's closures queued in here: same stream
        try:
            with ops.use(self.stream):
                yield
        finally:
            comm_thread().submit(thread_ctx.__exit__, None, None, None)

    def finish(self, handle):
        with self.comm(wait_compute=False):
            out = handle.wait()
            event = self.ops.record_event(self.stream)
        compute = self.ops.current(self.device)
        self.ops.wait_event(compute, event)
        for t in tensors_in(out):
            self.ops.record_stream(t, compute)
        return out


_STREAMS: dict[torch.device, CudaCommStreams] = {}


def comm_streams(device: torch.device) -> CommStreams:
    """This process's communication stream for ``device`` (one per device), or ``NO_STREAMS`` off CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return NO_STREAMS
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _STREAMS:
        _STREAMS[device] = CudaCommStreams(device)
    return _STREAMS[device]
