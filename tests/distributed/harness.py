"""Run a function on N real processes joined by a gloo process group on 127.0.0.1 (no mocks)."""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _worker(fn: Callable[..., Any], rank: int, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    import torch.distributed as dist

    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, init_method=f"tcp://127.0.0.1:{port}"
        )
        result = fn(rank, world_size, *args)
        torch.save({"ok": True, "result": result}, out)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, out)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable[..., Any], world_size: int, tmp_path: Path, *args: Any, timeout_s: float = 180.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes; return each rank's result."""
    from lancer_dist.dist import find_free_port

    ctx = mp.get_context("spawn")
    port = find_free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world_size, port, str(tmp_path), args))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout_s)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    results = []
    for r in range(world_size):
        f = tmp_path / f"rank{r}.pt"
        if not f.exists():
            raise RuntimeError(f"rank {r} produced no result (exit code {procs[r].exitcode})")
        rec = torch.load(f, weights_only=True)
        if not rec["ok"]:
            raise RuntimeError(f"rank {r} failed:\n{rec['error']}")
        results.append(rec["result"])
    return results
