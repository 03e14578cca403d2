"""Computation–communication overlap of a paired forward and backward chunk (report §3.2.1, Figure 4).

A stage's forward is a chain of pieces (``DSV3Stage.begin_forward``: embedding, Blocks, head + MTP).
A MoE ``Block`` whose dispatcher is expert-parallel runs as parts through its own steps
(``Block.attention``, ``MoE.route`` / ``dispatch`` / ``run_experts`` / ``combine`` / ``merge``), with
autograd cut between them (each part's inputs are fresh leaves):

    forward:  attn (norms, MLA, gate; launches dispatch) + shared experts | mlp (experts; launches combine) | out
    backward: out (launches combine-bwd) | mlp B (launches dispatch-bwd) | shared B + attn B

Each chunk is a generator that yields right before it waits on an all-to-all. ``run_pair`` alternates
the backward chunk of micro-batch b and the forward chunk of micro-batch f at every yield, starting
with the backward, so every all-to-all of one is in flight while the other computes (Figure 4):

    B: combine-bwd ▶ | F: attn ▶ dispatch, shared | B: mlp B ▶ dispatch-bwd | F: mlp ▶ combine |
    B: shared B, attn B, next layer's combine-bwd ▶ … | F: + residual, next layer's attn ▶ …

The shared experts (which need no all-to-all) sit where they lengthen the shortest window: each
all-to-all is in flight under (F costs a, m, s; B twice): combine-bwd a+s, dispatch s+2m, dispatch-bwd
m+2s, combine 2s+2a. With shared F after mlp and shared B before mlp B, dispatch-bwd had only m+s (the
two-hop dispatch-bwd, IB after NVLink in chunks, outlasted it) and dispatch only 2m.

The parts are the very ops of ``Block.forward`` and its autograd backward, and a full B accumulates
each part's weight gradients in the same autograd pass (as ``torch.autograd.backward`` over the whole
stage does), so results are bitwise those of the plain ``Pipeline`` on the same stages, overlapped or
not (``overlap=False`` runs the same parts F then B). Other pieces (the embedding, dense Blocks, the
head with its MTP modules, whose all-to-alls stay synchronous) run whole. The all-to-alls are
``async_op`` collectives (``parallel.all_to_all``); on CUDA each is issued, packed and unpacked on a
communication stream (``parallel.comm_streams``: the comm stream waits on an event of the compute
stream at launch, compute waits on an event recorded after the transfer; no host sync in between),
on the CPU that seam is a no-op. Two-hop dispatch runs its hops on a communication thread
(``parallel.two_hop_chunks``), so its second hop, chunk by chunk, progresses while the parts compute.

``parallel.overlap_pipeline.OverlapPipeline`` runs every pipeline stage this way.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Generator, Optional, Sequence

import torch
from torch import nn

from dsv3.model.block import Block
from dsv3.model.moe import MoE
from parallel.all_to_all import EPDispatcher, Transport
from parallel.comm_streams import NO_STREAMS, CommStreams
from parallel.schedules import Op
from parallel.trace import Tracer
from parallel.weight_grad import backward_input

WSink = Callable[[str, Callable[[], None]], None]   # receives each part's weight-grad closure
WAIT = "wait"   # trace category: this rank's main thread blocked on an all-to-all (EPDispatcher.wait_span)


# ----------------------------------------------------------------------- traced transport
class TracedDispatcher(EPDispatcher):
    """An ``EPDispatcher`` whose every all-to-all goes through ``transport`` and is recorded in ``tracer``,
    as are the main thread's blocking waits (``WAIT``). Shared, not copied, when a pipeline deep-copies
    its stages: it is this rank's communication, not a model weight."""

    def __init__(self, base: EPDispatcher, tracer: Optional[Tracer], transport: Transport):
        self.__dict__.update(base.__dict__)
        self.tracer, self.transport = tracer, transport

    def __deepcopy__(self, memo):
        return self


def trace_all_to_alls(model: nn.Module, tracer: Optional[Tracer], transport: Optional[Transport] = None) -> None:
    """Wrap every MoE layer's ``EPDispatcher`` (from ``apply_expert_parallel``) in a ``TracedDispatcher``
    (one already wrapped gets the new tracer and transport). ``transport``: default the production
    ``Transport``; a benchmark passes a modelled link (``parallel.sim.links.ModelledTransport``)."""
    transport = transport if transport is not None else Transport()
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        if isinstance(moe.dispatcher, TracedDispatcher):
            moe.dispatcher.tracer, moe.dispatcher.transport = tracer, transport
        elif isinstance(moe.dispatcher, EPDispatcher):
            moe.dispatcher = TracedDispatcher(moe.dispatcher, tracer, transport)


# --------------------------------------------------------------------------------- pieces
@dataclass
class Piece:
    """One step of a stage's forward chain: ``fn(x) -> y``, differentiable in ``params``. With ``block``
    (a ``Block``, ``fn`` being ``block(x, *rope)``) the executor may run it as the parts above instead."""
    name: str
    fn: Callable[[Optional[torch.Tensor]], torch.Tensor]
    params: list
    block: Optional[Block] = None
    rope: tuple = ()


def params_of(*modules: Optional[nn.Module]) -> list[nn.Parameter]:
    """The trainable parameters of ``modules``, each once."""
    seen = {id(p): p for m in modules if m is not None for p in m.parameters() if p.requires_grad}
    return list(seen.values())


def _splits(p: Piece) -> bool:
    """A MoE Block with an expert-parallel dispatcher: the only piece with all-to-alls to hide."""
    return p.block is not None and isinstance(p.block.ffn, MoE) and isinstance(p.block.ffn.dispatcher, EPDispatcher)


def _part_grads(outputs: list, grads: list, inputs: list, params: list, sink: Optional[WSink], name: str) -> list:
    """One part's backward: the inputs' gradients. Weight gradients: with ``sink`` None in the same
    autograd pass (each parameter's .grad accumulated once, its hooks firing, exactly as a
    ``torch.autograd.backward`` over the whole stage does); else queued on ``sink`` (a Bi op's W)."""
    if sink is None:
        for x in inputs:     # the inputs are this part's own leaves: their .grad is exactly the gradient
            x.grad = None
        torch.autograd.backward(outputs, grads, inputs=inputs + params)
        out = [x.grad for x in inputs]
        for x in inputs:
            x.grad = None
        return out
    out, weight = backward_input(outputs, grads, inputs, params)
    if params:
        sink(name, weight)
    return out


def _moe_forward(block: Block, x: torch.Tensor, cos, sin, tr: Tracer, streams: CommStreams) -> Generator:
    """``Block.forward`` through its MoE's steps (``MoE.forward``), cut at the all-to-alls (each issued
    and finished on ``streams``' communication stream)."""
    moe: MoE = block.ffn
    with tr.span("attn F"):
        h = block.attention(x, cos, sin)
        xn = block.ffn_input(h)
        B, T, D = xn.shape
        flat = xn.reshape(B * T, D)
        weights, indices, scores = moe.route(flat, block.ffn_source(h))
        w = weights.to(flat.dtype)
        x_send, w_send = flat.detach(), w.detach()
        with streams.comm(x_send, indices, w_send):
            handle = moe.dispatch(x_send, indices, w_send)
        aux = moe.balance(scores, indices, B)
    x_shared = y_shared = None
    if moe.shared_experts is not None:   # under this dispatch and the paired backward's combine-bwd
        with tr.span("shared F"):
            x_shared = flat.detach().requires_grad_()
            y_shared = moe.shared_experts(x_shared)
    yield
    recv = streams.finish(handle)
    with tr.span("mlp F"):
        x_recv, w_recv = recv.x.detach().requires_grad_(), recv.weight.detach().requires_grad_()
        recv = dataclasses.replace(recv, x=x_recv, weight=w_recv)
        y_rows = moe.run_experts(recv)
        y_send = y_rows.detach()
        with streams.comm(y_send):
            combine = moe.combine(y_send, recv)
    yield
    y_combined = streams.finish(combine).detach().requires_grad_()
    with tr.span("out F"):
        h_leaf = h.detach().requires_grad_()
        y_shared_leaf = None if y_shared is None else y_shared.detach().requires_grad_()
        aux_leaf = None if aux is None else aux.detach().requires_grad_()
        out = h_leaf + moe.attach_balance(moe.merge(y_combined, y_shared_leaf, (B, T, D)), aux_leaf)
    # what the backward needs, by part: attention (x, h, flat, w, aux), experts (x_recv, w_recv, y_rows),
    # shared experts (x_shared, y_shared) and the output's leaves (h_leaf, y_combined, y_shared_leaf, aux_leaf)
    return out, dict(x=x, h=h, flat=flat, w=w, aux=aux, hops=recv.hops, x_recv=x_recv, w_recv=w_recv,
                     y_rows=y_rows, x_shared=x_shared, y_shared=y_shared, h_leaf=h_leaf, y_combined=y_combined,
                     y_shared_leaf=y_shared_leaf, aux_leaf=aux_leaf, out=out)


def _moe_backward(block: Block, r: dict, g_out: torch.Tensor, tr: Tracer, sink: Optional[WSink],
                  streams: CommStreams) -> Generator:
    moe: MoE = block.ffn
    disp: EPDispatcher = moe.dispatcher
    with tr.span("out B"):
        leaves = [t for t in (r["h_leaf"], r["y_combined"], r["y_shared_leaf"], r["aux_leaf"]) if t is not None]
        g = dict(zip([id(t) for t in leaves], _part_grads([r["out"]], [g_out], leaves, [], sink, "out W")))
        g_y_combined = g[id(r["y_combined"])]
        with streams.comm(g_y_combined):
            route = disp.combine_backward(r["hops"], g_y_combined)
    yield
    (g_rows,) = streams.finish(route)
    with tr.span("mlp B"):
        g_x_recv, g_w_recv = _part_grads([r["y_rows"]], [g_rows], [r["x_recv"], r["w_recv"]], params_of(moe.experts),
                                         sink, "mlp W")
        g_x_recv = torch.zeros_like(r["x_recv"]) if g_x_recv is None else g_x_recv
        g_w_recv = torch.zeros_like(r["w_recv"]) if g_w_recv is None else g_w_recv
        g_w_recv = g_w_recv.to(torch.promote_types(r["w"].dtype, torch.float32))   # as _DispatchAttach.backward sends
        parts = [g_x_recv.to(r["flat"].dtype).contiguous(), g_w_recv.contiguous()]
        with streams.comm(parts):
            route = disp.dispatch_backward(r["hops"], parts)
    yield
    g_flat = None
    if r["y_shared"] is not None:   # under this dispatch-bwd and the paired forward's combine
        with tr.span("shared B"):
            (g_flat,) = _part_grads([r["y_shared"]], [g[id(r["y_shared_leaf"])]], [r["x_shared"]],
                                    params_of(moe.shared_experts), sink, "shared W")
    g_flat_routed, g_w = streams.finish(route)
    with tr.span("attn B"):
        g_flat = g_flat_routed if g_flat is None else g_flat + g_flat_routed
        outs, grads = [r["h"], r["flat"], r["w"]], [g[id(r["h_leaf"])], g_flat, g_w.to(r["w"].dtype)]
        if r["aux_leaf"] is not None:
            outs.append(r["aux"])
            grads.append(g[id(r["aux_leaf"])])
        params = params_of(block.attn_norm, block.attn, block.ffn_norm, moe.gate)
        (g_x,) = _part_grads(outs, grads, [r["x"]], params, sink, "attn W")
    return g_x


def stage_forward(stage: nn.Module, x: Optional[torch.Tensor], mb: dict, tr: Tracer,
                  streams: CommStreams = NO_STREAMS) -> Generator:
    """Generator over a stage's forward on micro-batch ``mb``; returns (output, record for
    ``stage_backward``). A stage with ``begin_forward(mb) -> pieces`` / ``end_forward()`` (``DSV3Stage``)
    runs piece by piece, each piece's input a fresh leaf; any other module runs whole. ``streams``: where
    the split Blocks' all-to-alls run (``parallel.comm_streams``)."""
    if hasattr(stage, "begin_forward"):
        pieces = stage.begin_forward(mb)
    else:
        pieces = [Piece(type(stage).__name__, lambda x: stage(x, mb), params_of(stage))]
    record = []
    for i, p in enumerate(pieces):
        if i > 0:
            x = x.detach().requires_grad_()
        if _splits(p):
            y, r = yield from _moe_forward(p.block, x, *p.rope, tr, streams)
        else:
            with tr.span(f"{p.name} F"):
                y = p.fn(x)
            r = dict(x=x, out=y)
        record.append((p, r))
        x = y
    if hasattr(stage, "end_forward"):
        stage.end_forward()
    return x, record


def stage_backward(record: list, g: Optional[torch.Tensor], tr: Tracer, sink: Optional[WSink] = None,
                   streams: CommStreams = NO_STREAMS) -> Generator:
    """Generator over a stage's backward; returns the input's gradient (None on a first stage).
    ``sink`` None: a full B (weight gradients accumulated as it goes); else a Bi, each part's weight
    gradient handed to ``sink(name, closure)`` for the W op."""
    for p, r in reversed(record):
        if _splits(p):
            g = yield from _moe_backward(p.block, r, g, tr, sink, streams)
        else:
            with tr.span(f"{p.name} B"):
                inputs = [] if r["x"] is None else [r["x"]]
                grads = _part_grads([r["out"]], [g], inputs, p.params, sink, f"{p.name} W")
                g = grads[0] if inputs else None
    return g


def drain(gen: Generator):
    """Runs a chunk to its end without interleaving (each all-to-all waited on right after launch)."""
    while True:
        try:
            next(gen)
        except StopIteration as e:
            return e.value


def run_pair(f_gen: Generator, b_gen: Generator, tr: Tracer, f_mb: int = -1, b_mb: int = -1,
             overlap: bool = True):
    """A paired F&B: (forward's return, backward's return). ``overlap``: Figure 4's interleaving,
    backward first; else the forward to its end, then the backward."""
    chunks = [["B", b_mb, b_gen], ["F", f_mb, f_gen]] if overlap else [["F", f_mb, f_gen], ["B", b_mb, b_gen]]
    done = {}
    while chunks:
        for c in list(chunks):
            phase, mb, gen = c
            with tr.context(phase, mb):
                try:
                    while True:
                        next(gen)
                        if overlap:
                            break
                except StopIteration as e:
                    done[phase] = e.value
                    chunks.remove(c)
    return done["F"], done["B"]


def pair_1f1b(ops: Sequence[Op]) -> list[Op]:
    """1F1B's steady state F(i+w), B(i) as one FB op (micro-batches differ; the last stage's F and B of
    one micro-batch stay apart). It cannot deadlock (F(i+w)'s activation came in the previous op, B(i)'s
    gradient from a rank whose B(i) needs nothing of this op), but on plain 1F1B it does not pay: rank
    r's pair i waits for rank r+1's pair i, which waits for rank r's pair i−1's forward output, so the
    steady state issues one pair per 2·(F&B) instead of one F and one B per F + B. Megatron pairs
    chunks of different virtual stages (interleaved 1F1B) to break that cycle; DualPipe pairs the two
    directions. Kept for that comparison (tests/test_overlap.py simulates it)."""
    out, i = [], 0
    while i < len(ops):
        a, b = ops[i], ops[i + 1] if i + 1 < len(ops) else None
        if a.kind == "F" and b is not None and b.kind == "B" and a.mb != b.mb:
            out.append(Op("FB", f=a, b=b, sends=a.sends + b.sends, recvs=a.recvs + b.recvs))
            i += 2
        else:
            out.append(a)
            i += 1
    return out

