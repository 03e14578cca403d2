"""A gloo process group on 127.0.0.1 for tests, benchmarks and simulated clusters on one machine.

``run_ranks(fn, world, *args)`` runs fn(rank, world, *args) in `world` fresh spawned processes (one
thread each) and returns their results by rank. A rank that raises fails the caller with its
traceback; a group that hangs is killed after `timeout` seconds."""
from __future__ import annotations

import os
import socket
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, queue, env, received):
    try:
        os.environ.update(env)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        torch.set_num_threads(1)
        import torch.distributed as dist
        from datetime import timedelta
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
        try:
            queue.put((rank, True, fn(rank, world, *args)))
            # tensors in the result travel as shared-memory handles that this process serves: stay
            # alive until the parent has taken every result (else it finds no handle under load)
            received.wait(timeout=600)
        finally:
            dist.destroy_process_group()
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world: int, *args, timeout: float = 180.0, env: dict | None = None) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    received = ctx.Event()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue, env or {}, received), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    try:
        import queue as q
        import time
        deadline = time.monotonic() + timeout
        while len(results) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"process group timed out after {timeout}s; finished ranks {sorted(results)}")
            try:
                rank, ok, value = queue.get(timeout=min(left, 5.0))
            except q.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in results]
                if dead:
                    raise RuntimeError(f"ranks {dead} died (exit codes {[procs[i].exitcode for i in dead]})")
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
    finally:
        received.set()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
    return [results[r] for r in range(world)]
