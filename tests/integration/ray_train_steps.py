"""N real ``Trainer.train_step`` calls on the SAME global batches, split evenly over the ranks, as a Ray Train job
or as one plain process; rank 0 writes the parameters, every rank where it ran.

    python -m tests.integration.ray_train_steps ray CONFIG OUT STEPS [key=value ...]   # job driver: TorchTrainer
    python -m tests.integration.ray_train_steps local CONFIG OUT STEPS                 # the 1-process reference

Under Ray the workers are built by ``launchers.ray_train`` exactly as for ``lancer submit ray`` (same
ScalingConfig from ``train.ray``, same process group from Ray Train, same Accelerate set-up); only the loop differs:
the global batches come from a world-size-1 stream, so both runs see the very same data (the training stream's
per-rank split depends on the world size).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lancer_dist.config import RunConfig, load_config


def _run_steps(cfg: RunConfig, out: Path, steps: int, where: dict[str, Any]) -> None:
    from lancer_dist.data.stream import TrainStream
    from lancer_dist.train.trainer import Trainer

    tr = Trainer(cfg)
    r, w = tr.rank, tr.world
    metrics = []
    stream = iter(TrainStream.from_config(cfg, tr.tokenizer, rank=0, world_size=1))
    for _ in range(steps):
        full = next(stream)
        local = full.shard(r, w)
        metrics.append(tr.train_step(local))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"worker-rank{r}.json").write_text(json.dumps({**where, "world": w}))
    if r == 0:
        model = tr.accelerator.unwrap_model(tr.model)
        save_file(
            {n: p.detach().contiguous() for n, p in model.named_parameters()}, str(out / "params.safetensors")
        )
        (out / "metrics.json").write_text(json.dumps(metrics))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def ray_worker(loop: dict[str, Any]) -> None:
    from launchers.ray_train import describe_worker, worker_config

    cfg = worker_config(loop)
    _run_steps(cfg, Path(loop["out"]), int(loop["steps"]), describe_worker())


def main(argv: list[str]) -> None:
    mode, config, out, steps, *overrides = argv
    if mode == "local":
        _run_steps(load_config(config, overrides), Path(out), int(steps), {"rank": 0})
        return
    from launchers.ray_train import fit

    fit(config, overrides, worker_fn=ray_worker, extra={"out": out, "steps": int(steps)})


if __name__ == "__main__":
    main(sys.argv[1:])
