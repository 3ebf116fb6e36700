"""Run under torchrun (N ranks) or plainly (1 process): one real Trainer.train_step on the SAME global batch,
split evenly over the ranks; rank 0 writes the parameters and metrics for the test to compare."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from lancer_dist.config import load_config
from lancer_dist.data.stream import TrainStream
from lancer_dist.train.trainer import Trainer


def main(config: str, out: str) -> None:
    cfg = load_config(config)
    tr = Trainer(cfg)
    full = next(iter(TrainStream(cfg, tr.tokenizer, rank=0, world_size=1)))
    r, w = tr.rank, tr.world
    local = full.shard(r, w)
    metrics = tr.train_step(local)
    if r == 0:
        model = tr.accelerator.unwrap_model(tr.model)
        Path(out).mkdir(parents=True, exist_ok=True)
        save_file(
            {n: p.detach().contiguous() for n, p in model.named_parameters()}, f"{out}/params.safetensors"
        )
        Path(out, "metrics.json").write_text(json.dumps(metrics))
    torch.distributed.barrier() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
