"""Run under torchrun (N ranks) or plainly (1 process): real Trainer.train_step calls on the SAME global batches,
each split evenly over the ranks; rank 0 writes the (gathered) parameters and the last step's metrics for the test
to compare.

    python -m tests.distributed.trainer_step_program CONFIG OUT [STEPS] [--save-final]

STEPS (default 1): the first STEPS global batches of the stream, one optimizer step each. ``--save-final``: also the
trainer's final model (``Trainer.save_final_model``: gathered, LoRA merged) in ``<output_dir>/final_model``."""

from __future__ import annotations

import json
import sys
from itertools import islice
from pathlib import Path

from safetensors.torch import save_file

from lancer_dist import dist
from lancer_dist.config import load_config
from lancer_dist.data.stream import TrainStream
from lancer_dist.train.trainer import Trainer


def main(config: str, out: str, steps: int = 1, save_final: bool = False) -> None:
    cfg = load_config(config)
    tr = Trainer(cfg)
    r, w = tr.rank, tr.world
    metrics: dict[str, float] = {}
    for full in islice(TrainStream.from_config(cfg, tr.tokenizer, rank=0, world_size=1), steps):
        metrics = tr.train_step(full.shard(r, w))
    # how many parameters this rank holds as shards (FSDP2 DTensors): 0 unless the model was really sharded
    metrics["sharded_parameters"] = sum(type(p).__name__ == "DTensor" for p in tr.model.parameters())
    # the full parameters: under DeepSpeed ZeRO-3 / FSDP2 each rank holds a shard, gathered here (a collective)
    state = tr.full_state_dict()
    if r == 0:
        names = [n for n, _ in tr.accelerator.unwrap_model(tr.model).named_parameters()]
        Path(out).mkdir(parents=True, exist_ok=True)
        save_file({n: state[n].detach().cpu().contiguous() for n in names}, f"{out}/params.safetensors")
        Path(out, "metrics.json").write_text(json.dumps(metrics))
    if save_final:
        tr.save_final_model()  # a collective too
    dist.shutdown()  # a last barrier, then the group is destroyed before the interpreter exits


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--save-final"]
    main(args[0], args[1], int(args[2]) if len(args) > 2 else 1, "--save-final" in sys.argv)
