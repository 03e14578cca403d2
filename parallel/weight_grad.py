"""Split a stage's backward into B (input grad) and W (weight grad) through the autograd graph
(zero-bubble pipelining, Qi et al. 2023 §2; DualPipe's Bi/W, report §3.2.1).

B runs only the graph nodes that lead to the stage's input. At every node of that part with an
edge into a weight-only branch, a pre-hook keeps the gradient flowing into the node; W later
restarts autograd from those nodes towards the weights alone. Nothing on the input path is
recomputed and no module needs a special Linear: any ``nn.Module`` works.

A parameter with a ``main_grad`` buffer (BF16 weights under ZeRO-1, ``parallel.zero``; Megatron's
main_grad) gets W's gradient added into that FP32 buffer, as the post-accumulate-grad hook does for a
full backward's: the micro-batches' BF16 pieces are summed in FP32, never in ``.grad``'s BF16.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge


def _graph(roots: Sequence[Node]) -> dict[Node, list[Node]]:
    """Every node reachable from ``roots``, with its next nodes."""
    nxt: dict[Node, list[Node]] = {}
    stack = list(roots)
    while stack:
        n = stack.pop()
        if n in nxt:
            continue
        nxt[n] = [m for m, _ in n.next_functions if m is not None]
        stack.extend(nxt[n])
    return nxt


def _reaching(nxt: dict[Node, list[Node]], targets: set[Node]) -> set[Node]:
    """Nodes from which some target is reachable (targets included)."""
    prev: dict[Node, list[Node]] = {n: [] for n in nxt}
    for n, ms in nxt.items():
        for m in ms:
            prev[m].append(n)
    seen, stack = set(), [t for t in targets if t in nxt]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(prev[n])
    return seen


def backward_input(outputs: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]],
                   inputs: Sequence[torch.Tensor], params: Sequence[torch.Tensor]
                   ) -> tuple[list[Optional[torch.Tensor]], Callable[[], None]]:
    """B: returns the inputs' gradients and a closure W that adds the weight gradients to ``.grad``
    (or, where a parameter has one, to its FP32 ``main_grad``)."""
    grads = [torch.ones_like(o) if g is None else g for o, g in zip(outputs, grads)]
    out_edges = [get_gradient_edge(o) for o in outputs]
    nxt = _graph([e.node for e in out_edges])
    param_node = {get_gradient_edge(p).node: p for p in params if p.requires_grad}
    param_node = {n: p for n, p in param_node.items() if n in nxt}
    in_nodes = {get_gradient_edge(x).node for x in inputs}
    on_input_path = _reaching(nxt, in_nodes)
    to_params = _reaching(nxt, set(param_node))

    # W restarts from (a) outputs whose node never reaches an input, (b) input-path nodes with an
    # edge into a weight-only branch; each start owns the parameters its weight-only branch reaches
    starts: list[tuple] = []   # (node or edge, grads holder, params)
    for e, g in zip(out_edges, grads):
        if e.node not in on_input_path and e.node in to_params:
            starts.append(([e], [g], _owned(e.node, nxt, on_input_path, param_node)))
    captured: dict[Node, list] = {}
    handles = []
    for n in on_input_path:
        if n in in_nodes:
            continue
        branch = [m for m in nxt[n] if m not in on_input_path and m in to_params]
        if branch:
            owned = [p for m in branch for p in _owned(m, nxt, on_input_path, param_node)]
            captured[n] = []
            starts.append((n, captured[n], owned))
            handles.append(n.register_prehook(lambda g_out, n=n: captured[n].extend(g_out)))
    _check_no_double_count(starts, nxt)
    if inputs:
        try:
            in_grads = torch.autograd.grad(outputs, inputs, grads, retain_graph=True, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
    else:
        in_grads = []

    def weight() -> None:
        for start, held, owned in starts:
            if isinstance(start, Node):
                pairs = [(GradientEdge(start, i), g) for i, g in enumerate(held) if g is not None]
                edges, gs = [e for e, _ in pairs], [g for _, g in pairs]
            else:
                edges, gs = start, held
            if not edges or not owned:
                continue
            owned = list({id(p): p for p in owned}.values())
            for p, g in zip(owned, torch.autograd.grad(edges, owned, gs, retain_graph=True, allow_unused=True)):
                if g is None:
                    continue
                main = getattr(p, "main_grad", None)
                if main is not None:
                    main.add_(g)   # FP32 += BF16 piece: the only rounding is the FP32 sum's
                else:
                    p.grad = g if p.grad is None else p.grad.add_(g)
        starts.clear()  # drops the graph: W is the last use of this micro-batch's activations

    return list(in_grads), weight


def _owned(start: Node, nxt: dict[Node, list[Node]], on_input_path: set[Node],
           param_node: dict[Node, torch.Tensor]) -> list[torch.Tensor]:
    """Parameters reachable from ``start`` without touching the input path."""
    seen, stack, out = set(), [start], []
    while stack:
        n = stack.pop()
        if n in seen or n in on_input_path:
            continue
        seen.add(n)
        if n in param_node:
            out.append(param_node[n])
        stack.extend(nxt[n])
    return out


def _check_no_double_count(starts: list[tuple], nxt: dict[Node, list[Node]]) -> None:
    """A weight used twice in one stage gets one W restart per use, each adding its own share. That
    is exact unless one restart can reach the other through the input path: then the engine would
    carry the first restart's gradient into the second's weight branch as well."""
    by_param: dict[int, list[Node]] = {}
    for start, _, owned in starts:
        if isinstance(start, Node):
            for p in {id(p) for p in owned}:
                by_param.setdefault(p, []).append(start)
    for nodes in by_param.values():
        for a in nodes:
            others = set(nodes) - {a}
            if others and others & _reachable(a, nxt):
                raise NotImplementedError("a weight is used at two depths of one stage's input path; the B/W split "
                                          "cannot separate them there: give this stage full B ops")


def _reachable(a: Node, nxt: dict[Node, list[Node]]) -> set[Node]:
    seen, stack = set(), list(nxt[a])
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(nxt[n])
    return seen
