"""Mutation check: plant each single-line bug of tests/mutation/mutations.py in a temporary copy of the
repository, run the tests it names (``pytest -x -q``), revert, and report caught / survived with the
test that caught it. Not part of the suite (tests/conftest.py ignores this folder).

    .venv/bin/python tests/mutation/run.py                 # every mutation, on a copy of HEAD
    .venv/bin/python tests/mutation/run.py --only ID ...   # some of them
    .venv/bin/python tests/mutation/run.py --worktree      # copy the working tree instead of HEAD
    .venv/bin/python tests/mutation/run.py --list

The copy lives under /tmp (the working tree is never touched); ``.cache`` (prepared data) is linked
into it. A test that already fails would make a mutation look caught, so after the mutations every test
that caught one runs once more on the unmutated copy (one pytest run) and must pass; ``--full-baseline``
instead runs all named tests unmutated first (slower: every test of every named file). A mutation whose
``old`` text is not found exactly once is reported as such, not run. Exit status 0 when every mutation
was applied and caught, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from mutations import MUTATIONS  # noqa: E402


def make_copy(worktree: bool) -> str:
    dst = tempfile.mkdtemp(prefix="dsv3_mutation_")
    if worktree:
        files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               check=True, capture_output=True).stdout.decode().split("\0")
        for f in filter(None, files):
            if os.path.isfile(os.path.join(ROOT, f)):
                os.makedirs(os.path.dirname(os.path.join(dst, f)) or dst, exist_ok=True)
                shutil.copy2(os.path.join(ROOT, f), os.path.join(dst, f))
    else:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", dst], input=archive, check=True)
    if os.path.isdir(os.path.join(ROOT, ".cache")):
        os.symlink(os.path.join(ROOT, ".cache"), os.path.join(dst, ".cache"))
    return dst


def run_tests(copy: str, tests: list[str], timeout: float, stop_first: bool = True) -> tuple[int, str, float]:
    env = dict(os.environ, PYTHONPATH=copy, PYTHONDONTWRITEBYTECODE="1")
    env.pop("DSV3_FAULT", None)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-x"] if stop_first else []), *tests]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout + proc.stderr, time.time() - t0
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return -1, out, time.time() - t0


def first_failure(output: str) -> str:
    m = re.search(r"^(FAILED|ERROR) (\S+)", output, re.M)
    return m.group(2) if m else "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=None, help="mutation ids")
    ap.add_argument("--worktree", action="store_true", help="copy the working tree (default: HEAD)")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per test run")
    ap.add_argument("--full-baseline", action="store_true", help="run all named tests unmutated first")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy")
    ap.add_argument("--list", action="store_true")
    a = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if a.only is None or m["id"] in a.only]
    if a.only and len(chosen) != len(set(a.only)):
        print(f"unknown mutation id(s): {sorted(set(a.only) - {m['id'] for m in chosen})}", file=sys.stderr)
        return 2
    if a.list:
        for m in chosen:
            print(f"{m['id']:34} {m['area']:14} {m['file']:32} {' '.join(m['tests'])}")
        return 0
    start = time.time()
    copy = make_copy(a.worktree)
    print(f"copy of {'the working tree' if a.worktree else 'HEAD'} in {copy}; {len(chosen)} mutations", flush=True)
    try:
        if a.full_baseline:
            tests = sorted({t for m in chosen for t in m["tests"]})
            rc, out, dt = run_tests(copy, tests, a.timeout * 2, stop_first=False)
            print(f"baseline (unmutated, {len(tests)} test targets): {'pass' if rc == 0 else 'FAIL'} in {dt:.0f} s",
                  flush=True)
            if rc != 0:
                print(out[-3000:])
                print("the named tests fail without any mutation: fix them first", file=sys.stderr)
                return 1
        rows = []
        for m in chosen:
            path = os.path.join(copy, m["file"])
            text = open(path).read() if os.path.isfile(path) else ""
            n = text.count(m["old"])
            if n != 1:
                status, by, dt = ("TARGET NOT FOUND" if n == 0 else f"TARGET FOUND {n}x"), "-", 0.0
            else:
                with open(path, "w") as f:
                    f.write(text.replace(m["old"], m["new"]))
                try:
                    rc, out, dt = run_tests(copy, m["tests"], a.timeout)
                finally:
                    with open(path, "w") as f:
                        f.write(text)
                if rc == -1:
                    status, by = "caught (timeout)", "timeout"
                elif rc == 0:
                    status, by = "SURVIVED", "-"
                else:
                    status, by = "caught", first_failure(out)
            rows.append((m, status, by, dt))
            print(f"{m['id']:34} {m['area']:14} {status:17} {dt:5.0f} s  {by}", flush=True)
        catchers = sorted({by for _, s, by, _ in rows if s == "caught" and by != "?"})
        if catchers and not a.full_baseline:
            rc, out, dt = run_tests(copy, catchers, a.timeout * 2, stop_first=False)
            bad = set(re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)) if rc != 0 else set()
            print(f"the {len(catchers)} catching tests on the unmutated copy: "
                  f"{'all pass' if rc == 0 else f'FAIL {sorted(bad) or out[-2000:]}'} ({dt:.0f} s)", flush=True)
            if rc != 0:
                rows = [(m, "caught by a test failing unmutated" if by in bad or not bad else s, by, t)
                        for m, s, by, t in rows]
        caught = sum(s == "caught" or s == "caught (timeout)" for _, s, _, _ in rows)
        print(f"\n{caught}/{len(rows)} caught; survived: "
              f"{[m['id'] for m, s, _, _ in rows if s == 'SURVIVED'] or 'none'}; "
              f"not applied: {[m['id'] for m, s, _, _ in rows if s.startswith('TARGET')] or 'none'}; "
              f"{time.time() - start:.0f} s in all")
        return 0 if caught == len(rows) else 1
    finally:
        if a.keep:
            print(f"kept {copy}")
        else:
            shutil.rmtree(copy, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
