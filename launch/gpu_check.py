"""One-shot GPU check (issue 17 G), run by ``launch/gpu_check.sh``; see that file for usage.

Each part runs in its own subprocess (``--part KEY``) with its own timeout, and a global budget of
6 minutes; a part writes its report section line by line, so a part killed at its timeout keeps what
it finished, and the report is appended to as each part ends. A part's verdict (PASS / FAIL / INFO)
goes to a small JSON file beside its section; a crash or timeout is written into the report instead.
The process exits 0 once the report is written, whatever the parts' verdicts (the summary table says).

``--dry-run``: the same parts at tiny sizes on the CPU (Triton kernels under the interpreter, gloo for
the process group, configs/debug.yaml shrunk, two steps): it checks the check itself, in the suite.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "launch"))
# key, section title, timeout on the GPU (s), timeout in the dry run (s)
PARTS = [
    ("env", "0. Environment", 20, 60),
    ("kernels", "1. Triton kernels against their torch references", 90, 150),
    ("gemm", "2. FP8 GEMM benchmark (benchmarks/bench_fp8_gemm.py)", 80, 120),
    ("train", "3. Training configs/small_moe.yaml: BF16, FP8, FP8 against the torch reference", 160, 240),
    ("zero1", "4. parallelize() (ZeRO-1) on a process group of world size 1", 50, 150),
    ("syncs", "5. Host syncs per step and the attention kernel", 40, 150),
]
BUDGET_S = {"gpu": 360, "dry": 600}
LOSS_RTOL = 1e-3


# ------------------------------------------------------------------------------------ section writing
class Section:
    """A part's section file, appended to and flushed line by line (a killed part keeps its lines)."""

    def __init__(self, path: str):
        self.path = path
        self.f = open(path, "a", buffering=1)

    def line(self, text: str = "") -> None:
        self.f.write(text + "\n")
        self.f.flush()

    def table(self, *header: str) -> None:
        self.line("| " + " | ".join(header) + " |")
        self.line("|" + "---|" * len(header))

    def row(self, *cells) -> None:
        self.line("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")

    def done(self, status: str, note: str) -> None:
        self.line(f"\n**{status}**: {note}")
        with open(self.path + ".json", "w") as f:
            json.dump({"status": status, "note": note}, f)


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:300]


# ---------------------------------------------------------------------------------------- the parts
def part_env(sec: Section, a) -> None:
    import platform
    import torch
    sec.line(f"- Python {platform.python_version()} ({sys.executable}); torch {torch.__version__} "
             f"(CUDA {torch.version.cuda}); TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')}")
    try:
        import triton
        sec.line(f"- Triton {triton.__version__}")
    except ImportError:
        sec.line("- Triton: missing (part 1 and the FP8 runs need it)")
    cuda = torch.cuda.is_available()
    extra = {"cuda": cuda}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        extra["device"] = p.name
        sec.line(f"- GPU: {p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
                 f"{p.total_memory / 2**30:.1f} GiB")
        try:
            drv = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            drv = f"n/a ({first_line(e)})"
        try:
            import torch.cuda.nccl as nccl
            v = nccl.version()
            nccl_version = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as e:  # noqa: BLE001 - a version line must not stop the check
            nccl_version = f"n/a ({first_line(e)})"
        sec.line(f"- driver {drv or 'n/a'}; NCCL {nccl_version}; cuDNN {torch.backends.cudnn.version()}")
        gpu, why = hardware_row(p.name)
        sec.line(f"- hardware table: {gpu.key}: BF16 {gpu.bf16_dense_tflops:g} / FP8 {gpu.fp8_dense_tflops:g} "
                 f"dense TFLOPS ({gpu.source})" if gpu else f"- hardware table: {why}")
    else:
        sec.line("- GPU: none visible to torch" + (" (the dry run hides it on purpose)" if a.dry_run else ""))
    optional = {"transformers": "nothing in this check needs it",
                "transformer_engine": "part 2 has no Transformer Engine column"}
    for pkg, without in optional.items():   # found or not, never imported here
        if importlib.util.find_spec(pkg) is None:
            sec.line(f"- {pkg}: missing, skipped ({without})")
        else:
            try:
                version = importlib.metadata.version(pkg.replace("_", "-"))
            except importlib.metadata.PackageNotFoundError:
                version = "(version unknown)"
            sec.line(f"- {pkg} {version}")
    with open(sec.path + ".env.json", "w") as f:
        json.dump(extra, f)
    sec.done("INFO", f"{extra.get('device', 'no GPU')}, torch {torch.__version__}")


def part_kernels(sec: Section, a) -> None:
    from gpu_check_kernels import run_checks
    dev = "cpu" if a.dry_run else "cuda"
    sec.line(f"Device: {dev}{' (Triton interpreter)' if a.dry_run else ''}; sizes: "
             f"{'the CPU tests’ odd shapes' if a.dry_run else 'the CPU tests’ odd shapes and DeepSeek-V3-sized ones'}.\n")
    sec.table("check", "kernels", "measured", "bound", "result")
    found, missing, failed = run_checks(dev, a.dry_run, lambda r: sec.row(*r))
    sec.line(f"\nKernels in triton_kernels/ ({len(found)}): {', '.join(found)}")
    sec.line(f"Not covered by a check: {', '.join(missing) or 'none'}")
    ok = failed == 0 and not missing
    sec.done("PASS" if ok else "FAIL", f"{failed} failed check(s), {len(missing)} kernel(s) not covered")


def part_gemm(sec: Section, a) -> None:
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_fp8_gemm.py")] + (["--smoke"] if a.dry_run else [])
    sec.line(f"`{' '.join(cmd[1:])}`" + (" (CPU interpreter: the timings mean nothing)" if a.dry_run else "") + "\n")
    sec.line("```text")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    lines = []
    for text in proc.stdout:
        lines.append(text.rstrip("\n"))
        sec.line(lines[-1])
    rc = proc.wait()
    sec.line("```")
    geo = next((s for s in lines if s.startswith("geometric-mean")), "")
    errs = [float(tok) for s in lines if "|" in s for tok in s.split("|")[-1].split()[:1] if _is_float(tok)]
    broken = sum("| error:" in s for s in lines)
    # our FP8 output against the BF16 matmul: E4M3 noise, under 5% (tests/test_fp8_gemm.py's bound)
    ok = rc == 0 and errs and max(errs) < 0.05 and not broken
    sec.done("PASS" if ok else "FAIL", f"exit {rc}; {len(errs)} shapes, worst err {max(errs, default=float('nan')):.2e} "
             f"(bound 5e-2){f', {broken} shapes failed' if broken else ''}; {geo or 'no M = 4096 geometric mean'}")


def _is_float(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


from gpu_check_train import hardware_row, part_syncs, part_train, part_zero1  # noqa: E402 - needs sys.path above

PART_FUNCS = {"env": part_env, "kernels": part_kernels, "gemm": part_gemm, "train": part_train,
              "zero1": part_zero1, "syncs": part_syncs}


# ------------------------------------------------------------------------------------ the orchestrator
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_part(key: str, timeout_s: float, a, work: str) -> tuple[str, str, float, str]:
    """(status, note, seconds, section text) of one part run in a subprocess with a timeout; never raises."""
    try:
        return _run_part(key, timeout_s, a, work)
    except Exception as e:  # noqa: BLE001 - the orchestrator must always reach the summary
        return "ERROR", f"could not run the part: {first_line(e)}", 0.0, ""


def _run_part(key: str, timeout_s: float, a, work: str) -> tuple[str, str, float, str]:
    sec_path = os.path.join(work, f"{key}.md")
    log_path = os.path.join(work, f"{key}.log")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PYTHONUNBUFFERED="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if a.dry_run:   # CPU only, kernels under the interpreter, even on a machine with a GPU
        env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    else:           # compiled kernels on the GPU, whatever the caller's shell says
        env["TRITON_INTERPRET"] = "0"
    cmd = [sys.executable, __file__, "--part", key, "--section", sec_path, "--work", work, "--budget", str(timeout_s)]
    cmd += ["--dry-run"] if a.dry_run else []
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout_s, 1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # the part and every process it started
            proc.wait()
            rc = None
    seconds = time.monotonic() - t0
    text = open(sec_path).read() if os.path.exists(sec_path) else ""
    if text.count("```") % 2:
        text += "```\n"   # a code block left open by a killed part
    if os.path.exists(sec_path + ".json"):
        verdict = json.load(open(sec_path + ".json"))
        return verdict["status"], verdict["note"], seconds, text
    tail = "".join(open(log_path).readlines()[-25:])
    if rc is None:
        status, note = "TIMEOUT", f"killed after {timeout_s:.0f} s; what finished is above"
    else:
        status, note = "ERROR", f"the part exited {rc} before its verdict"
    text += f"\n**{status}**: {note}\n\nLast lines of its output:\n\n```text\n{tail}```\n"
    return status, note, seconds, text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="One-shot GPU check (issue 17 G)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU: checks the check itself")
    p.add_argument("--out", help="report path (default $OUT/gpu_check_report.md or ./gpu_check_report.md)")
    p.add_argument("--parts", default="0,1,2,3,4,5", help="comma-separated part numbers to run (default all)")
    p.add_argument("--timeout", action="append", default=[], metavar="PART=SECONDS",
                   help="another timeout for one part, e.g. 3=200 (the 6-minute budget still applies)")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--section", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.part:   # inside a part's subprocess
        sec = Section(a.section)
        PART_FUNCS[a.part](sec, a)
        return 0
    try:
        wanted = {int(n) for n in a.parts.split(",") if n.strip()}
        limits = {int(k): float(v) for k, v in (t.split("=", 1) for t in a.timeout)}
    except ValueError:
        print(f"gpu_check: --parts {a.parts!r} / --timeout {a.timeout}: expected part numbers like 1,3 and "
              f"PART=SECONDS like 3=200", file=sys.stderr)
        return 2
    out = a.out or os.path.join(os.environ.get("OUT") or ".", "gpu_check_report.md")
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    mode = "dry" if a.dry_run else "gpu"
    deadline = time.monotonic() + BUDGET_S[mode]
    work = tempfile.mkdtemp(prefix="dsv3_gpu_check_")
    log_path = os.path.splitext(out)[0] + ".log"
    with open(out, "w") as f:
        f.write(f"# dsv3 GPU check{' (dry run on CPU)' if a.dry_run else ''}\n\n"
                f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}, `launch/gpu_check.sh{' --dry-run' if a.dry_run else ''}`; "
                f"budget {BUDGET_S[mode]} s; work folder {work} (removed at the end); the parts' output is in "
                f"{os.path.basename(log_path)} beside this file\n")
    t_start, summary, cuda = time.monotonic(), [], True
    chosen = [(i, key, title, limits.get(i, t_dry if a.dry_run else t_gpu))
              for i, (key, title, t_gpu, t_dry) in enumerate(PARTS) if i in wanted]
    # the dry run's parts use the CPU only and are independent: two at a time (the suite's 2 cores);
    # on the GPU one at a time, so that no part's timing shares the device
    pool = ThreadPoolExecutor(max_workers=2) if a.dry_run else None
    pending = {key: pool.submit(run_part, key, min(limit, deadline - time.monotonic()), a, work)
               for _, key, _, limit in chosen} if pool else {}
    for i, key, title, limit in chosen:
        left = deadline - time.monotonic()
        print(f"[gpu_check] part {title} ...", flush=True)
        if key in pending:
            status, note, seconds, text = pending[key].result()
        elif i > 0 and not cuda:
            status, note, seconds, text = "SKIP", "no CUDA GPU visible (use --dry-run for the CPU self-check)", 0.0, ""
        elif left < 5:
            status, note, seconds, text = "SKIP", f"the {BUDGET_S[mode]} s budget is spent", 0.0, ""
        else:
            status, note, seconds, text = run_part(key, min(limit, left), a, work)
        if key == "env" and os.path.exists(os.path.join(work, "env.md.env.json")):
            cuda = json.load(open(os.path.join(work, "env.md.env.json"))).get("cuda", False)
        with open(out, "a") as f:
            f.write(f"\n## {title}\n\n{text}" + ("" if text else f"**{status}**: {note}\n"))
        summary.append((title.split(".")[0], status, seconds, note))
        print(f"[gpu_check]   {status} in {seconds:.0f} s: {note}", flush=True)
    if pool:
        pool.shutdown()
    with open(out, "a") as f:
        f.write("\n## Summary\n\n| part | result | seconds | note |\n|---|---|---|---|\n")
        for n, status, seconds, note in summary:
            f.write(f"| {n} | {status} | {seconds:.0f} | {note.replace('|', '/')} |\n")
        passed = sum(s in ("PASS", "INFO") for _, s, _, _ in summary)
        f.write(f"\n{passed} of {len(summary)} parts passed (INFO counts as passed); "
                f"total {time.monotonic() - t_start:.0f} s.\n")
    with open(log_path, "w") as log:   # every part's and every training run's output, for a post-mortem
        for name in sorted(os.listdir(work)):
            text = open(os.path.join(work, name), errors="replace").read() if name.endswith(".log") else ""
            if text.strip():
                log.write(f"===== {name}\n{text}\n")
    shutil.rmtree(work, ignore_errors=True)   # run folders hold checkpoints: not kept
    print(f"report: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
