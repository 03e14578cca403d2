"""Guarded triton import: kernel modules stay importable (and their torch paths usable) without triton.

Without triton, ``triton.jit`` leaves the kernel a plain, never-called function and ``tl.constexpr``
is a dummy annotation; the launchers check HAS_TRITON and raise a clear error instead.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Without a GPU Triton runs only in its interpreter (the kernel tests). The choice is read when
    # triton.language's own @jit helpers (tl.max, tl.cdiv, …) are decorated, i.e. at triton's
    # first import, so it is made here, before it; an explicit TRITON_INTERPRET=0 is respected.
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # torch-only install
    HAS_TRITON = False

    class _NoTriton:
        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

    class _NoTl:
        class constexpr:  # noqa: N801 - mirrors tl.constexpr for annotations and globals
            def __init__(self, value=None):
                self.value = value

    triton = _NoTriton()
    tl = _NoTl()


def require_triton() -> None:
    if not HAS_TRITON:
        raise RuntimeError("backend='triton' needs the triton package; install it or use backend='torch'")
