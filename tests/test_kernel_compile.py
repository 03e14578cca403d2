"""Every Triton kernel compiles for Hopper (sm_90a) and Blackwell (sm_100a) on this GPU-less machine.

``triton_kernels.aot`` compiles each kernel's first launch made by FP8 training (report §3.3) in
a subprocess with TRITON_INTERPRET=0 (two forked compiling workers) and reads the SASS with cuobjdump. The
FP8 GEMMs must become the FP8 tensor-core instructions — wgmma ``QGMMA`` with E4M3 operands on
sm_90a, tcgen05 ``UTCQMMA`` (kind::f8f6f4) on sm_100a — the E5M6 wgrad the FP16 ones, and the
quantisation kernels no MMA.
The full matrix of tile configurations is ``benchmarks/kernel_report.py``.
"""
from __future__ import annotations

import platform
import re
import sys

import pytest

from triton_kernels import aot

# triton is a declared dependency on Linux (pyproject); its wheels ship ptxas and cuobjdump for x86_64
TRITON_DECLARED = sys.platform.startswith("linux") and platform.machine() == "x86_64"
# the largest dynamic shared memory one block may opt into on H100 and B200 (227 KiB)
MAX_SMEM_PER_BLOCK = 227 * 1024


@pytest.fixture(scope="module")
def compiled():
    if not TRITON_DECLARED:
        pytest.skip("triton with its NVIDIA tools is a dependency only on Linux x86_64")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        pytest.fail(f"triton is a declared dependency on Linux but does not import ({e}): pip install triton")
    try:
        return aot.compile_facts(first=True, jobs=2)
    except RuntimeError as e:  # a missing ptxas / cuobjdump or an unsupported target says so here
        pytest.fail(str(e), pytrace=False)


def _by_target(compiled, target):
    facts = [f for f in compiled["facts"] if f["target"] == target]
    return {f["kernel"]: f for f in facts}


def _jit_sources() -> dict[str, str]:
    """{name: source text of the function} from a scan of the package's files for @triton.jit."""
    sources = {}
    for path in sorted(aot.PACKAGE_DIR.glob("*.py")):
        text = path.read_text()
        for m in re.finditer(r"^@triton\.jit[^\n]*\n(?:@[^\n]*\n)*def\s+(\w+)", text, re.M):
            # the body runs to the next line that starts at column 0 with code
            end = re.compile(r"^[^\s#)]", re.M).search(text, m.end())
            sources[m.group(1)] = text[m.start():end.start() if end else len(text)]
    return sources


def test_every_jit_function_is_enumerated_and_compiled(compiled):
    decorated = sum(len(re.findall(r"^@triton\.jit", p.read_text(), re.M)) for p in aot.PACKAGE_DIR.glob("*.py"))
    scanned = _jit_sources()
    assert len(scanned) == decorated
    kernels, helpers = compiled["kernels"], compiled["helpers"]
    # the import-time enumeration finds exactly the decorated functions: a new kernel cannot hide
    assert sorted(kernels + list(helpers)) == sorted(scanned), f"failed to import: {compiled['unimportable']}"
    # a device helper is compiled inside a kernel that calls it
    for helper, callers in helpers.items():
        assert callers and all(re.search(rf"\b{helper}\(", scanned[k]) for k in callers), helper
    # the training probes launch every kernel, so each has a configuration to compile
    unlaunched = sorted(set(kernels) - set(compiled["launched"]))
    assert not unlaunched, f"no launch of {unlaunched}: add one to triton_kernels.aot.training_launches"
    for target in aot.TARGETS:
        assert sorted(_by_target(compiled, target)) == kernels, target


# the tensor-core operand type of each GEMM kernel's tl.dot: E4M3 for the FP8 GEMMs of report §3.3;
# E4M3 × E5M6 (the wo-input wgrad, §3.3.3) runs on FP16 tensor cores, both widening exactly to FP16
DOT_OPERANDS = {"_fp8_gemm_kernel": "e4m3", "_grouped_gemm_kernel": "e4m3", "_grouped_wgrad_kernel": "e4m3",
                "_e5m6_wgrad_kernel": "f16"}
BITS = {"e4m3": 8, "f16": 16}


def expected_mma(target: str, operands: str, tile_n: int) -> tuple[str, str]:
    """(SASS opcode, PTX instruction) of a tile_n-wide dot with FP32 accumulation on ``target``.

    Hopper wgmma: m64 rows per warpgroup, n = the tile width, k = 256 bits of operand
    (32 for 8-bit, 16 for 16-bit); SASS QGMMA (8-bit) / HGMMA (16-bit). Blackwell tcgen05:
    UTCQMMA with kind::f8f6f4, UTCHMMA with kind::f16 (shapes live in the instruction descriptor).
    """
    if target == "sm_90a":
        k = 256 // BITS[operands]
        sass = {"e4m3": f"QGMMA.64x{tile_n}x{k}.F32.E4M3.E4M3", "f16": f"HGMMA.64x{tile_n}x{k}.F32"}[operands]
        return sass, f"wgmma.mma_async.sync.aligned.m64n{tile_n}k{k}.f32.{operands}.{operands}"
    return ({"e4m3": "UTCQMMA", "f16": "UTCHMMA"}[operands],
            "tcgen05.mma.cta_group::1.kind::" + {"e4m3": "f8f6f4", "f16": "f16"}[operands])


@pytest.mark.parametrize("target", sorted(aot.TARGETS))
def test_gemms_use_tensor_cores_of_their_precision_and_nothing_else_does(compiled, target):
    scanned = _jit_sources()
    facts = _by_target(compiled, target)
    # every kernel with a tl.dot has its operand type stated above: a new GEMM must be added there
    gemms = {k for k in facts if "tl.dot(" in scanned[k]}
    assert gemms == set(DOT_OPERANDS), f"state the tensor-core operand type of {gemms ^ set(DOT_OPERANDS)}"
    for kernel, f in facts.items():
        if kernel not in DOT_OPERANDS:
            assert f["mma"] == {} and f["ptx_mma"] == [], (kernel, f["mma"], f["ptx_mma"])
            continue
        tile = {k: v for k, v in f["config"].items() if k.startswith("BLOCK")}
        assert set(tile.values()) == {128}, (kernel, tile)  # the launchers' 128-wide tiles, N_C = 128
        sass, ptx = expected_mma(target, DOT_OPERANDS[kernel], 128)
        assert set(f["mma"]) == {sass} and f["ptx_mma"] == [ptx], (kernel, f["mma"], f["ptx_mma"])
        if target == "sm_90a":
            # one 128-long promotion interval (N_C) is 128 / k wgmma steps, once per loop body
            k = 256 // BITS[DOT_OPERANDS[kernel]]
            assert f["mma"][sass] % (128 // k) == 0, (kernel, f["mma"])
        else:
            assert f["tmem_cols"] >= 128  # the 128×128 FP32 accumulator lives in tensor memory


def test_compiled_configuration_is_the_launchers_choice(compiled):
    from triton_kernels.fp8_gemm import gemm_blocks
    block_m, block_n, warps = gemm_blocks(512)  # the probes' first fp8_linear call has M = 512
    for target in aot.TARGETS:
        f = _by_target(compiled, target)["_fp8_gemm_kernel"]
        assert (f["config"]["BLOCK_M"], f["config"]["BLOCK_N"], f["num_warps"]) == (block_m, block_n, warps)
        assert f["num_stages"] == 3 and f["pointers"]["a_ptr"] == f["pointers"]["b_ptr"] == "fp8e4nv"
        assert any(re.fullmatch(r"fp8_gemm<(_FP8Linear\.)?forward", s) for s in f["sites"]), f["sites"]


@pytest.mark.parametrize("target", sorted(aot.TARGETS))
def test_fprop_gemms_pipeline_in_shared_memory_without_spills(compiled, target):
    facts = _by_target(compiled, target)
    for f in facts.values():
        assert 0 <= f["shared_bytes"] <= MAX_SMEM_PER_BLOCK, (f["kernel"], f["shared_bytes"])
    for kernel in ("_fp8_gemm_kernel", "_grouped_gemm_kernel"):
        f = facts[kernel]
        c = f["config"]
        # software pipelining keeps num_stages FP8 tiles of a and b in flight: ≥ stages · (M·K + N·K) bytes
        per_stage = c["BLOCK_M"] * c["BLOCK_K"] + c["BLOCK_N"] * c["BLOCK_K"]
        assert f["shared_bytes"] >= f["num_stages"] * per_stage, (kernel, f["shared_bytes"])
        # the tiles arrive by 16-byte asynchronous copies (what lets them overlap the MMAs), none byte-wise
        assert f["global_loads"].get("cp.async 16B", 0) > 0 and "ld 1B" not in f["global_loads"], f["global_loads"]
        assert f["spill_store_bytes"] == f["spill_load_bytes"] == f["stack_bytes"] == 0, kernel
