"""Ahead-of-time compilation of the Triton kernels for a named GPU, on a machine without one.

``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32))``
lowers a kernel to PTX and (through the ptxas Triton ships) a cubin; ``cuobjdump`` then gives
its SASS and resource use. This is how CI shows that the FP8 GEMMs of report §3.3 become
tensor-core code on Hopper (``QGMMA``, wgmma with E4M3 operands) and Blackwell (``UTCQMMA``,
tcgen05), with no GPU.

Why a subprocess: without a GPU ``_triton_compat`` sets TRITON_INTERPRET=1 before triton's first
import, and under the interpreter ``@triton.jit`` gives an InterpretedFunction with no compiler
path; the choice is fixed at import, so compiling needs a fresh interpreter with TRITON_INTERPRET=0.

What is compiled: the launches the launchers themselves make. ``training_launches`` drives
``fp8_linear`` and ``fp8_grouped_mm`` forward and backward, the E5M6 cache and the dequantisers on
small CPU tensors with every kernel replaced by a recorder; each recorded call is bound by Triton's
own launch binder for the target (``create_function_from_signature`` and ``JITFunction._pack_args``,
internals of Triton 3.9: another version fails loudly here), so tile sizes, warps and stages are the
launcher's choice and the specialisation (dtypes, 16-divisible ints and pointers, unit strides as
constants) is a real launch's. That specialisation matters: with every integer typed i32 and no
alignment facts, _fp8_gemm_kernel's loads are neither vectorised nor pipelined.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import multiprocessing
import os
import pkgutil
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO = PACKAGE_DIR.parent
# target name -> CUDA compute capability; Triton emits sm_90a / sm_100a (the arch-specific
# feature sets with wgmma / tcgen05) whenever the kernel needs them
TARGETS = {"sm_90a": 90, "sm_100a": 100}
DEFAULT_PROBES = "triton_kernels.aot:training_launches"

_MNEMONIC = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.x]*)")


# ---------------------------------------------------------------- inside the compiling subprocess

UNIMPORTABLE: dict[str, str] = {}  # module -> ImportError (an optional dependency missing)


def jit_functions() -> dict[str, object]:
    """{name: JITFunction} of every module of the package, found by import (needs TRITON_INTERPRET=0).

    A module whose import fails (an optional dependency such as Transformer Engine) is noted in
    UNIMPORTABLE; a kernel in it is then missing here, which the test's source scan reports.
    """
    from triton.runtime.jit import JITFunction
    import triton_kernels
    found = {}
    for info in pkgutil.iter_modules(triton_kernels.__path__):
        try:
            module = importlib.import_module(f"triton_kernels.{info.name}")
        except ImportError as e:
            UNIMPORTABLE[info.name] = str(e)
            continue
        for name, obj in vars(module).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == module.__name__:
                found[name] = obj
    return found


def split_kernels(functions: dict[str, object]) -> tuple[list[str], dict[str, list[str]]]:
    """(launchable kernels, {device helper: kernels calling it}): a helper is a jit function another one calls."""
    callers = {h: [k for k, f in functions.items() if k != h and re.search(rf"\b{h}\(", f.src)]
               for h in functions}
    helpers = {h: ks for h, ks in callers.items() if ks}
    return sorted(set(functions) - set(helpers)), helpers


class _Recorder:
    """Stands in for a JITFunction in its module: ``kernel[grid](*args, **kw)`` binds the call, launches nothing."""

    def __init__(self, fn, name, backend, launches):
        self.fn, self.name, self.backend, self.launches = fn, name, backend, launches
        from triton.runtime.jit import create_function_from_signature
        self.binder = create_function_from_signature(fn.signature, fn.params, backend)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            launcher, caller = sys._getframe(1).f_code, sys._getframe(2).f_code
            site = f"{launcher.co_name}<{getattr(caller, 'co_qualname', caller.co_name)}"
            bound, specialization, options = self.binder(*args, **kwargs)
            options, signature, constexprs, attrs = self.fn._pack_args(self.backend, kwargs, bound,
                                                                       specialization, options)
            self.launches.append(dict(kernel=self.name, fn=self.fn, signature=signature, constexprs=constexprs,
                                      attrs=attrs, options=options, site=site))
        return launch


@contextlib.contextmanager
def recording(functions: dict[str, object], target, launches: list):
    """Swap every kernel global (by name, in the module defining it) for a recorder; helpers stay."""
    from triton.compiler import make_backend
    backend = make_backend(target)
    swapped = []
    kernels, _ = split_kernels(functions)
    for name in kernels:
        fn = functions[name]
        module = sys.modules[fn.fn.__module__]
        swapped.append((module, name, fn))
        setattr(module, name, _Recorder(fn, name, backend, launches))
    try:
        yield
    finally:
        for module, name, fn in swapped:
            setattr(module, name, fn)


def training_launches() -> None:
    """The launches FP8 training makes (report §3.3), each kernel's most common one first.

    fp8_linear and fp8_grouped_mm forward and backward: M = 512 takes the launchers' 128-row GEMM
    tile, M = 64 the 64-row one (decode-sized); BF16 activations as GPU training runs them;
    pow2_scale both ways (the dispatch choice of §3.3.3). Then the E5M6 cache of §3.3.3 (quantise,
    re-tile, the E4M3 × E5M6 wgrad) and the dequantisers, through their launchers. Sizes are
    multiples of 16, as DeepSeek-V3's are, so the specialisation matches a real run.
    """
    import torch
    from triton_kernels import e5m6, quant
    from triton_kernels.fp8_linear import fp8_linear
    from triton_kernels.fp8_grouped_mm import fp8_grouped_mm
    for m in (512, 64):
        x = torch.randn(m, 256, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(384, 256, dtype=torch.bfloat16, requires_grad=True)
        fp8_linear(x, w, backend="triton").sum().backward()
    offsets = torch.tensor([96, 96, 512], dtype=torch.int32)  # an empty expert, tiles from row 96
    for pow2 in (False, True):
        x = torch.randn(512, 256, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(3, 384, 256, dtype=torch.bfloat16, requires_grad=True)
        fp8_grouped_mm(x, w, offsets, backend="triton", pow2_scale=pow2).sum().backward()
    x = torch.randn(512, 256, dtype=torch.bfloat16)
    x_t, x_t_s = e5m6.e5m6_retile(*e5m6.e5m6_quant(x))
    dy_t, dy_t_s = quant.act_quant_t(torch.randn(512, 384, dtype=torch.bfloat16))
    e5m6.e5m6_wgrad(dy_t, dy_t_s, x_t, x_t_s)
    e5m6.e5m6_dequant(*e5m6.e5m6_quant(x), dtype=torch.bfloat16)
    w_fp8, w_s = quant.weight_quant(torch.randn(384, 256))
    for dtype in (torch.bfloat16, torch.float32):
        quant.weight_dequant(w_fp8, torch.ones(3, 2), dtype=dtype)


def _load_probes(spec: str):
    """'package.module:function' or 'path/to/file.py:function' -> the function."""
    where, func = spec.rsplit(":", 1)
    if where.endswith(".py"):
        loaded = importlib.util.spec_from_file_location(Path(where).stem, where)
        module = importlib.util.module_from_spec(loaded)
        sys.modules[loaded.name] = module
        loaded.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    return module, getattr(module, func)


def capture(probes: str, target) -> list[dict]:
    """Every distinct launch the probes make, in first-call order, with the call sites that made it."""
    from triton.runtime.jit import JITFunction
    functions = jit_functions()
    probe_module, probe = _load_probes(probes)
    functions.update({n: f for n, f in vars(probe_module).items()
                      if isinstance(f, JITFunction) and f.fn.__module__ == probe_module.__name__})
    launches: list[dict] = []
    with recording(functions, target, launches):
        probe()
    distinct: dict[str, dict] = {}
    for launch in launches:
        # one entry per tile configuration and operand dtypes; of launches differing only in
        # specialisation (which ints are 16-divisible or 1) the first, a training-sized one, stands
        key = repr((launch["kernel"], tile_config(launch), launch["options"].num_warps,
                    launch["options"].num_stages, pointer_dtypes(launch)))
        distinct.setdefault(key, dict(launch, sites=[]))["sites"].append(launch["site"])
    return list(distinct.values())


def tile_config(launch: dict) -> dict:
    """The launch's values of the kernel's declared ``tl.constexpr`` parameters (tile sizes, switches)."""
    params = launch["fn"].params
    return {params[i].name: v for (i,), v in launch["constexprs"].items() if params[i].is_constexpr}


def pointer_dtypes(launch: dict) -> dict:
    return {k: v[1:] for k, v in launch["signature"].items() if v.startswith("*")}


def _tool(name: str) -> str:
    from triton import knobs
    return getattr(knobs.nvidia, name.replace("-", "_")).path


def missing_tools(capability: int) -> list[str]:
    """The NVIDIA tools a compile for ``capability`` needs that Triton cannot find (ptxas, cuobjdump)."""
    from triton.backends.nvidia.compiler import get_ptxas
    missing = []
    for name, find in (("ptxas", lambda: get_ptxas(capability).path), ("cuobjdump", lambda: _tool("cuobjdump"))):
        try:
            find()
        except RuntimeError as e:
            missing.append(f"{name} ({e})")
    return missing


def sass_facts(cubin: bytes, dump: str | None = None) -> dict:
    """Registers, stack, static shared memory and the MMA instructions of a cubin (cuobjdump)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], check=True, capture_output=True,
                               text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", f.name], check=True, capture_output=True,
                              text=True).stdout
    if dump is not None:
        Path(f"{dump}.sass").write_text(sass)
    res = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    mma: dict[str, int] = {}
    for op in _MNEMONIC.findall(sass):
        if op.split(".")[0].endswith("MMA"):  # HMMA, QGMMA, UTCQMMA …; not HFMA2.MMA (an FMA on the MMA pipe)
            mma[op] = mma.get(op, 0) + 1
    return dict(registers=int(res["REG"]), stack_bytes=int(res["STACK"]), local_bytes=int(res["LOCAL"]),
                static_shared_bytes=int(res["SHARED"]), mma=mma, sass_lines=sass.count("\n"))


def global_loads(ptx: str) -> dict[str, int]:
    """How the kernel reads global memory, by PTX instruction: ``cp.async`` copies into shared memory
    by width (what the software pipeline overlaps with the MMAs), TMA bulk copies, and loads into
    registers by width (1-byte loads of FP8 mean the address had no provable alignment)."""
    loads: dict[str, int] = {}
    copy = r"\bcp\.async\.c[ag]\.shared\.global\S*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-f]+|\d+)"
    for width in re.findall(copy, ptx):  # cp.async.cg.shared.global [dst], [src], bytes
        key = f"cp.async {int(width, 0)}B"
        loads[key] = loads.get(key, 0) + 1
    if tma := len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)):
        loads["tma"] = tma
    for vec, bits in re.findall(r"\bld\.global[\w.]*?\.(?:v([248])\.)?[bfsu](8|16|32|64)\b", ptx):
        key = f"ld {int(vec or 1) * int(bits) // 8}B"
        loads[key] = loads.get(key, 0) + 1
    return loads


def compile_launch(launch: dict, target, dump: str | None = None) -> dict:
    """Compile one captured launch for ``target``; facts from ptxas's log, the metadata and the SASS."""
    import triton
    from triton.compiler import ASTSource
    from triton import knobs
    src = ASTSource(launch["fn"], launch["signature"], launch["constexprs"], launch["attrs"])
    log = io.StringIO()
    t0 = time.perf_counter()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True  # printed to stdout after ptxas runs
        compiled = triton.compile(src, target=target, options=launch["options"].__dict__)
    seconds = time.perf_counter() - t0
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log.getvalue())
    if spills is None:
        raise RuntimeError(f"{launch['kernel']}: no ptxas -v log (cached compile?): {log.getvalue()[-300:]}")
    meta = compiled.metadata
    if dump is not None:  # a path prefix: <dump>.ptx and <dump>.sass
        Path(f"{dump}.ptx").write_text(compiled.asm["ptx"])
    ptx_target = re.search(r"^\.target\s+(\w+)", compiled.asm["ptx"], re.M).group(1)
    ptx_mma = sorted(set(re.findall(r"\b(?:wgmma\.mma_async|tcgen05\.mma|mma\.sync)[\w.:]*", compiled.asm["ptx"])))
    return dict(kernel=launch["kernel"], target=ptx_target, config=tile_config(launch), num_warps=meta.num_warps,
                num_stages=meta.num_stages, pointers=pointer_dtypes(launch), sites=sorted(set(launch["sites"])),
                ptx_mma=ptx_mma, global_loads=global_loads(compiled.asm["ptx"]),
                shared_bytes=meta.shared, tmem_cols=getattr(meta, "tmem_size", 0),
                spill_store_bytes=int(spills.group(1)), spill_load_bytes=int(spills.group(2)),
                compile_s=round(seconds, 2), **sass_facts(compiled.asm["cubin"], dump))


_WORK: list = []  # (launch, target) pairs, set before the worker pool forks


def _compile_item(args) -> dict:
    index, dump_dir = args
    launch, target = _WORK[index]
    dump = None if dump_dir is None else f"{dump_dir}/{launch['kernel']}.sm{target.arch}.{index}"
    return compile_launch(launch, target, dump)


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", nargs="+", choices=sorted(TARGETS), required=True)
    parser.add_argument("--probes", default=DEFAULT_PROBES)
    parser.add_argument("--first", action="store_true", help="only each kernel's first launch")
    parser.add_argument("--jobs", type=int, default=1, help="compiling worker processes")
    parser.add_argument("--dump-dir", help="also write each kernel's PTX and SASS here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") != "0":
        raise SystemExit("triton_kernels.aot: run with TRITON_INTERPRET=0 (the interpreter cannot compile)")
    from triton.backends.compiler import GPUTarget
    from triton.runtime.cache import triton_key
    _WORK.clear()
    for name in args.targets:
        target = GPUTarget("cuda", TARGETS[name], 32)
        if missing := missing_tools(target.arch):
            raise SystemExit(f"triton_kernels.aot: Triton's NVIDIA tools are missing: {', '.join(missing)}; "
                             "reinstall triton (it ships them in triton/backends/nvidia/bin) or set TRITON_<TOOL>_PATH")
        launches = capture(args.probes, target)
        if args.first:
            firsts: dict[str, dict] = {}
            for launch in launches:
                firsts.setdefault(launch["kernel"], launch)
            launches = list(firsts.values())
        _WORK.extend((launch, target) for launch in launches)
    kernels, helpers = split_kernels(jit_functions())
    triton_key()  # Triton hashes its own library once per process: here, before the workers fork
    # GEMMs (the slow compiles) first, so the workers finish together
    order = sorted(range(len(_WORK)), key=lambda i: "tl.dot(" not in _WORK[i][0]["fn"].src)
    items = [(i, args.dump_dir) for i in order]
    if args.jobs > 1:
        # fork: the workers inherit the captured launches (JITFunctions do not pickle) and the imports
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            results = pool.map(_compile_item, items, chunksize=1)
    else:
        results = [_compile_item(item) for item in items]
    facts = [f for _, f in sorted(zip(order, results), key=lambda x: x[0])]
    launched = sorted({launch["kernel"] for launch, _ in _WORK})
    json.dump(dict(kernels=kernels, helpers=helpers, unimportable=UNIMPORTABLE, launched=launched, facts=facts),
              sys.stdout)
    return 0


# ---------------------------------------------------------------- in the caller

def compile_facts(targets=tuple(TARGETS), probes: str = DEFAULT_PROBES, first: bool = False,
                  jobs: int = 2, timeout: float = 900) -> dict:
    """Compile the probes' launches for each target in one subprocess with ``jobs`` compiling workers.

    Returns {"kernels", "helpers", "launched", "facts": [one dict per (launch, target)]}; raises
    RuntimeError with the subprocess's last words if any compile fails (a missing ptxas or
    cuobjdump included).
    """
    cmd = [sys.executable, "-m", "triton_kernels.aot", "--targets", *targets, "--probes", probes,
           "--jobs", str(jobs)] + (["--first"] if first else [])
    with tempfile.TemporaryDirectory(prefix="dsv3-aot-") as cache:
        # a private, empty cache: every kernel really compiles, so ptxas writes the log we parse
        env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=cache, TRITON_DEFAULT_FP_FUSION="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                cwd=REPO, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:  # a timeout or an interrupt leaves no compiler running (the workers share its group)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"AOT compile for {', '.join(targets)} failed (exit {proc.returncode}):\n{err[-3000:]}")
    return json.loads(out)


if __name__ == "__main__":
    sys.exit(_main())
