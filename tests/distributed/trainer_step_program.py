"""Run under torchrun (N ranks) or plainly (1 process): one real Trainer.train_step on the SAME global batch,
split evenly over the ranks; rank 0 writes the (gathered) parameters and metrics for the test to compare."""

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
    # how many parameters this rank holds as shards (FSDP2 DTensors): 0 unless the model was really sharded
    metrics["sharded_parameters"] = sum(type(p).__name__ == "DTensor" for p in tr.model.parameters())
    # the full parameters: under DeepSpeed ZeRO-3 / FSDP2 each rank holds a shard, gathered here (a collective)
    state = tr.full_state_dict()
    if r == 0:
        names = [n for n, _ in tr.accelerator.unwrap_model(tr.model).named_parameters()]
        Path(out).mkdir(parents=True, exist_ok=True)
        save_file({n: state[n].detach().cpu().contiguous() for n in names}, f"{out}/params.safetensors")
        Path(out, "metrics.json").write_text(json.dumps(metrics))
    torch.distributed.barrier() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
