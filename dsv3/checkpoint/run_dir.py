"""Ownership of a run folder: one training run at a time, nothing rewritten before a resume is valid.

``RUN_DIR/.run.lock`` (JSON: pid, host, start time, heartbeat) is created atomically by rank 0
(``O_CREAT | O_EXCL``) and its heartbeat refreshed by a daemon thread every ``stale_s / 4`` seconds.
A second run into the same folder finds a live lock and stops with one line. A lock is stale — and
taken over with a warning — when its heartbeat is older than ``train.lock_stale_s`` or, on the same
host, when its pid no longer exists (a SIGKILLed run leaves its lock behind).

Takeover is a rename of a freshly written lock over the stale one, then a read-back: of two runs that
take over the same stale lock at once, the one whose lock is read back wins, the other refuses.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
from typing import Optional

from dsv3.errors import UserError

LOCK_NAME = ".run.lock"


class RunLocked(UserError):
    """Another live run owns the folder."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Held by rank 0 for the whole run: ``acquire()`` at start, ``release()`` at exit."""

    def __init__(self, run_dir: str, stale_s: float):
        self.run_dir, self.stale_s = run_dir, stale_s
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.me = dict(pid=os.getpid(), host=socket.gethostname(), start=time.time())
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _record(self) -> bytes:
        return json.dumps(dict(self.me, heartbeat=time.time())).encode()

    def _read(self) -> Optional[dict]:
        try:
            with open(self.path, "rb") as f:
                return json.loads(f.read().decode())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable or half-written: judged by the file's age below

    def _is_mine(self, rec: Optional[dict]) -> bool:
        return bool(rec) and rec.get("pid") == self.me["pid"] and rec.get("host") == self.me["host"] \
            and rec.get("start") == self.me["start"]

    def _stale(self, rec: dict) -> Optional[str]:
        """Why the lock is stale, or None if its owner is alive."""
        beat = rec.get("heartbeat")
        if not isinstance(beat, (int, float)):
            try:
                beat = os.path.getmtime(self.path)
            except OSError:
                return "it vanished"
        age = time.time() - beat
        if age > self.stale_s:
            return f"its heartbeat is {age:.0f} s old (train.lock_stale_s={self.stale_s:g})"
        if rec.get("host") == self.me["host"] and isinstance(rec.get("pid"), int) and not _pid_alive(rec["pid"]):
            return f"its process {rec['pid']} on this host is gone"
        return None

    def acquire(self) -> None:
        try:
            os.makedirs(self.run_dir, exist_ok=True)
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            self._take_over()
        except OSError as e:
            raise UserError(f"cannot create the run folder lock {self.path}: {e.strerror}; "
                            f"check train.out_dir is writable") from None
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(self._record())
        self._thread = threading.Thread(target=self._beat, name="dsv3-run-lock", daemon=True)
        self._thread.start()

    def _take_over(self) -> None:
        rec = self._read()
        if rec is None:  # released between our two calls: try again from the start
            return self._create_again()
        why = self._stale(rec)
        if why is None:
            raise RunLocked(f"train.out_dir={self.run_dir} is in use by another run (pid {rec.get('pid')} on "
                            f"{rec.get('host')}, heartbeat {time.time() - rec.get('heartbeat', 0):.0f} s ago); "
                            f"use another train.out_dir or stop that run")
        print(f"warning: taking over the stale lock of {self.run_dir}: {why}", file=sys.stderr, flush=True)
        tmp = f"{self.path}.{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(self._record())
        os.replace(tmp, self.path)
        time.sleep(0.05)  # a concurrent taker's rename lands before this read-back, not after
        if not self._is_mine(self._read()):
            raise RunLocked(f"train.out_dir={self.run_dir} was taken over by another run at the same moment; "
                            f"use another train.out_dir")

    def _create_again(self) -> None:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            raise RunLocked(f"train.out_dir={self.run_dir} is in use by another run that just started") from None
        with os.fdopen(fd, "wb") as f:
            f.write(self._record())

    def _beat(self) -> None:
        while not self._stop.wait(max(self.stale_s / 4, 0.05)):
            if not self._is_mine(self._read()):
                return  # taken over (we were judged stale): never write over the new owner
            tmp = f"{self.path}.{os.getpid()}"
            try:
                with open(tmp, "wb") as f:
                    f.write(self._record())
                os.replace(tmp, self.path)
            except OSError:
                pass  # a full disk must not kill the run; the lock just ages

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._is_mine(self._read()):
            try:
                os.remove(self.path)
            except OSError:
                pass


def has_checkpoints(run_dir: str) -> list[str]:
    """Names of checkpoint folders of a run (``ckpt_NNNNNNN``, one-process or sharded, complete or not,
    and the temporary folders a writer leaves) in run_dir; a user's ``ckpt_best`` is not one."""
    if not os.path.isdir(run_dir):
        return []
    from dsv3.checkpoint.store import CKPT_RE, PARTIAL_RE
    return sorted(n for n in os.listdir(run_dir) if CKPT_RE.match(n) or PARTIAL_RE.match(n))


def clear_for_fresh_run(run_dir: str) -> None:
    """train.overwrite=true with resume=none: the old run's checkpoints, metrics and TensorBoard
    events go (the lock is held, so no other run is using them)."""
    for n in has_checkpoints(run_dir) + ["tensorboard"]:
        shutil.rmtree(os.path.join(run_dir, n), ignore_errors=True)
    for n in ("metrics.jsonl",):
        try:
            os.remove(os.path.join(run_dir, n))
        except FileNotFoundError:
            pass


def truncate_metrics(run_dir: str, step: int) -> int:
    """Drop metrics.jsonl lines after ``step`` (the resumed checkpoint's): a resume re-runs those steps.
    Rewritten atomically; returns the number of lines dropped."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    keep, dropped = [], 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
                s = rec.get("step") if isinstance(rec, dict) else None
            except ValueError:
                s = None  # a line cut by a kill mid-write
            if isinstance(s, int) and s <= step:
                keep.append(raw if raw.endswith(b"\n") else raw + b"\n")
            else:
                dropped += 1
    if dropped:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return dropped

