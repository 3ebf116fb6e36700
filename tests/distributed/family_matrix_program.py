"""The family matrix's step program (tests/integration/test_family_matrix.py): run under torchrun (N ranks) or
plainly (1 process), it loops over run configs, one per backbone family, in ONE launch: for each it builds the real
``Trainer`` (Accelerate DDP, DeepSpeed ZeRO or FSDP2, as the config says), runs ``Trainer.train_step`` on the first
STEPS global batches of the stream, each split evenly over the ranks with ``TrainBatch.shard``, and rank 0 writes
the gathered parameters and every step's metrics to ``OUT/<family>/`` (the family is the config's parent directory).

    python -m tests.distributed.family_matrix_program OUT STEPS CONFIG [CONFIG ...]

One launch per strategy instead of one per family: process start-up, imports and the process group (most of a tiny
model's run time) are paid once."""

from __future__ import annotations

import gc
import json
import sys
from itertools import islice
from pathlib import Path

from safetensors.torch import save_file

from lancer_dist import dist
from lancer_dist.config import load_config
from lancer_dist.data.stream import TrainStream
from lancer_dist.train.trainer import Trainer


def run_family(config: str, out: Path, steps: int) -> None:
    cfg = load_config(config)
    tr = Trainer(cfg)
    try:
        r, w = tr.rank, tr.world
        history = [
            tr.train_step(full.shard(r, w))
            for full in islice(TrainStream.from_config(cfg, tr.tokenizer, rank=0, world_size=1), steps)
        ]
        # how many parameters this rank holds as FSDP2 DTensor shards: 0 unless the model was really sharded
        sharded = sum(type(p).__name__ == "DTensor" for p in tr.model.parameters())
        state = tr.full_state_dict()  # gathered from ZeRO-3 / FSDP2 shards: a collective
        if r == 0:
            names = [n for n, _ in tr.accelerator.unwrap_model(tr.model).named_parameters()]
            out.mkdir(parents=True, exist_ok=True)
            save_file(
                {n: state[n].detach().cpu().contiguous() for n in names}, str(out / "params.safetensors")
            )
            (out / "metrics.json").write_text(json.dumps({"history": history, "sharded_parameters": sharded}))
    finally:
        if tr.lock is not None:
            tr.lock.release()
    dist.barrier()


def _reset_accelerate() -> None:
    """A new Accelerator per family: Accelerate keeps its state (the DeepSpeed plugin included) in a process-wide
    singleton, which refuses to be set up twice; the process group (PartialState) stays."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    gc.collect()


def main(out: str, steps: int, configs: list[str]) -> None:
    for config in configs:
        run_family(config, Path(out) / Path(config).parent.name, steps)
        _reset_accelerate()
    dist.shutdown()  # a last barrier, then the group is destroyed before the interpreter exits


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
