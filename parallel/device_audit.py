"""Audit of collective arguments against the model's device, runnable on a CPU-only machine (issue 17 B).

Under a plain NCCL process group every collective needs tensors on the model's device; a tensor made
with ``torch.zeros(n)`` (no ``device=``) lives on the host and stops a multi-GPU run at its first
collective. On a CPU machine the host *is* the model's device, so checking ``t.device`` alone can never
fail. This audit therefore tracks where each tensor would live on a GPU run, with a
``TorchFunctionMode`` that sees every torch call of the audited code:

- host: a tensor created from no tensor input and without ``device=`` (``torch.zeros``, ``torch.tensor``,
  ``torch.empty``, ...: the default device is the CPU), the result of ``.cpu()``, and whatever is computed
  from host tensors only;
- the model's device: everything else — the model's parameters, buffers, batches and autograd's
  gradients (made before the audit or in C++), factories given ``device=``, ``.to(device)``.

``.cpu()`` and ``.to(device)`` always return a new tensor here (they copy on a GPU run, while on the
CPU they may return ``self``), so the host copy and the device copy keep their own places.
Two kinds of finding, each with the ``file:line`` of the call in the audited code:

- ``collective``: a torch.distributed collective or point-to-point call (every entry point listed in
  ``ENTRY_POINTS``, batched P2P ops included) given a host tensor, or a tensor not on ``expected``;
- ``mixed``: an op whose inputs mix host tensors (other than 0-dim ones, which CUDA promotes like
  Python numbers) with device tensors — CUDA raises there too (e.g. a host buffer ``index_add_`` of
  device rows). Copies (``copy_``, ``__setitem__``, ``.to``) and indexing with host indices are allowed.

Limits: on the CPU, ``.to("cpu")`` and ``device="cpu"`` cannot be told from ``.to(model_device)``
and are taken as the model's device (write ``.cpu()`` for a host copy), and code that compares
``t.device`` with the model's device before moving it sees equal devices. Likewise a function that
branches on its input's device takes its CPU branch here: ``CPU_BRANCHES`` names those whose CPU branch
mixes a host table with its input by design (a GPU run never takes it), and ops inside them are not
reported as mixed. The comm thread of the two-hop all-to-all is tracked too (its closures run inside the
mode); other threads are not.

    audit = DeviceAudit(torch.device("cpu"))
    with audit:
        parallel_model.train_step(rows, lr, mtp_weight)   # parallel_model = parallelize(model, mesh, cfg)
    assert not audit.findings, audit.findings
"""
from __future__ import annotations

import collections
import os
import threading
import traceback

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

HOST = "_dsv3_audit_host"
ENTRY_POINTS = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter", "reduce_scatter_tensor",
                "broadcast", "reduce", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv",
                "isend", "irecv", "batch_isend_irecv", "all_gather_object", "gather_object", "broadcast_object_list",
                "scatter_object_list", "send_object_list", "recv_object_list", "barrier", "monitored_barrier")
_MIX_OK = {"copy_", "__setitem__", "__getitem__", "to", "cpu", "cuda", "__get__", "__set__", "index_put_",
           "__format__", "__repr__", "tolist", "item", "__bool__", "__float__", "__int__", "__len__"}
_HERE = os.path.abspath(__file__)
# (file under the repository, function): a CPU-only branch, guarded by ``x.device.type == "cpu"``
CPU_BRANCHES = {
    # E4M3 decode through a 256-entry table made at import (a host tensor when the module is first
    # imported inside the audit); CUDA inputs take ``x.float()``
    (os.path.join("triton_kernels", "quant_ref.py"), "fp8_to_float"),
}


def is_host(t: torch.Tensor) -> bool:
    return getattr(t, HOST, False)


def _mark(t: torch.Tensor, host: bool) -> torch.Tensor:
    setattr(t, HOST, host)
    return t


def _frame():
    """The innermost frame outside torch and this module (the audited call), or None."""
    for fr in reversed(traceback.extract_stack()[:-2]):
        f = os.path.abspath(fr.filename)
        if f != _HERE and f"{os.sep}torch{os.sep}" not in f and f"{os.sep}contextlib" not in f:
            return fr
    return None


def _site(fr=None) -> str:
    """file:line (function) of the audited call."""
    fr = fr or _frame()
    return f"{os.path.relpath(os.path.abspath(fr.filename))}:{fr.lineno} ({fr.name})" if fr else "?"


def _cpu_branch(fr) -> bool:
    return fr is not None and any(os.path.abspath(fr.filename).endswith(os.sep + f) and fr.name == fn
                                  for f, fn in CPU_BRANCHES)


def _tensors(x) -> list[torch.Tensor]:
    out = []
    for leaf in tree_leaves(x):
        if isinstance(leaf, torch.Tensor):
            out.append(leaf)
        elif isinstance(leaf, dist.P2POp):
            out.append(leaf.tensor)
    return out


def _move_target(args, kwargs):
    """What a ``.to``/``.cuda`` call moves to: a tensor (to(other)), a device, or None (dtype only)."""
    if kwargs.get("device") is not None:
        return kwargs["device"]
    for a in args[1:]:
        if isinstance(a, (torch.Tensor, torch.device, str, int)) and not isinstance(a, bool):
            return a
    return None


class _Tracker(TorchFunctionMode):
    def __init__(self, audit: "DeviceAudit"):
        super().__init__()
        self.audit = audit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.audit._depth():   # inside an audited collective: torch's own code, not ours
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "cpu":
            out = func(*args, **kwargs)
            return _mark(out.clone() if out is args[0] else out, True)
        if name in ("to", "cuda") and args and isinstance(args[0], torch.Tensor):
            target = args[1] if name == "cuda" and len(args) > 1 else _move_target(args, kwargs)
            if name == "to" and target is None:
                out = func(*args, **kwargs)
                return out if out is args[0] else _mark(out, is_host(args[0]))
            host = is_host(target) if isinstance(target, torch.Tensor) else False
            out = func(*args, **kwargs)
            if out is args[0] and is_host(out) != host:
                out = out.clone()
            return out if out is args[0] else _mark(out, host)
        ins = _tensors((args, kwargs))
        host_in = [t for t in ins if is_host(t)]
        dev_in = [t for t in ins if not is_host(t)]
        if host_in and dev_in and name not in _MIX_OK and any(t.dim() > 0 for t in host_in) \
                and not _cpu_branch(_frame()):
            self.audit._find("mixed", f"{name} mixes host tensors {[tuple(t.shape) for t in host_in]} with "
                                      f"device tensors")
        out = func(*args, **kwargs)
        made_on_host = kwargs.get("device") is None and (not ins or (host_in and not dev_in))
        if made_on_host:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and not any(t is i for i in ins):
                    _mark(t, True)
        return out


class DeviceAudit:
    """Context manager: while active, every torch.distributed entry point of ``ENTRY_POINTS`` is
    checked and the audited code's torch calls are tracked (see the module docstring). ``findings``:
    list of (kind, site, detail); ``calls``: entry point → number of (outermost) calls; ``call_sites``:
    ``file:line (function)`` of each checked call → their number."""

    def __init__(self, expected: torch.device):
        self.expected = torch.device(expected)
        self.findings: list[tuple[str, str, str]] = []
        self.calls: collections.Counter = collections.Counter()
        self.call_sites: collections.Counter = collections.Counter()
        self._local = threading.local()
        self._lock = threading.Lock()
        self._saved: list = []
        self._mode = None

    def _depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def _find(self, kind: str, detail: str) -> None:
        with self._lock:
            self.findings.append((kind, _site(), detail))

    def _check(self, name: str, args, kwargs) -> None:
        site = _site()
        with self._lock:
            self.calls[name] += 1
            self.call_sites[site] += 1
        for t in _tensors((args, kwargs)):
            if is_host(t) or t.device != self.expected:
                location = "the host" if is_host(t) else str(t.device)
                self._find("collective", f"dist.{name} got a {tuple(t.shape)} {t.dtype} tensor on {location}, "
                                         f"the model is on {self.expected}")

    def _wrap(self, name: str, orig):
        def audited(*args, **kwargs):
            if self._depth():
                return orig(*args, **kwargs)
            self._check(name, args, kwargs)
            self._local.depth = 1
            try:
                return orig(*args, **kwargs)
            finally:
                self._local.depth = 0
        audited.__wrapped__ = orig
        return audited

    def _in_mode(self, fn):
        def run(*args):
            with _Tracker(self):
                return fn(*args)
        return run

    def __enter__(self) -> "DeviceAudit":
        for name in ENTRY_POINTS:
            orig = getattr(c10d, name)
            wrapped = self._wrap(name, orig)
            for mod in (dist, c10d):   # P2POp checks its op against c10d's isend/irecv
                self._saved.append((mod, name, getattr(mod, name)))
                setattr(mod, name, wrapped)
        from parallel import two_hop_chunks
        orig_submit = two_hop_chunks._CommThread.submit
        self._saved.append((two_hop_chunks._CommThread, "submit", orig_submit))
        two_hop_chunks._CommThread.submit = lambda thread, fn, *a: orig_submit(thread, self._in_mode(fn), *a)
        self._mode = _Tracker(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
        for obj, name, value in reversed(self._saved):
            setattr(obj, name, value)
        self._saved = []

    def sites(self, kind: str | None = None) -> list[str]:
        return [site for k, site, _ in self.findings if kind in (None, k)]
