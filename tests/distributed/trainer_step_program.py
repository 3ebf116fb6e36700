"""Run under torchrun (N ranks) or plainly (1 process): one real Trainer.train_step on the SAME global batch,
split evenly over the ranks; rank 0 writes the parameters and metrics for the test to compare."""

from __future__ import annotations

import dataclasses
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
    r, w, g = tr.rank, tr.world, cfg.data.retrieval.group_size
    b = full.query_input_ids.shape[0] // w
    m = full.erasure_input_ids.shape[0] // w
    qs, ps, xs = slice(r * b, (r + 1) * b), slice(r * b * g, (r + 1) * b * g), slice(r * m, (r + 1) * m)
    local = dataclasses.replace(
        full,
        query_input_ids=full.query_input_ids[qs],
        query_attention_mask=full.query_attention_mask[qs],
        passage_input_ids=full.passage_input_ids[ps],
        passage_attention_mask=full.passage_attention_mask[ps],
        erasure_input_ids=full.erasure_input_ids[xs],
        erasure_attention_mask=full.erasure_attention_mask[xs],
        erasure_languages=full.erasure_languages[xs],
        passage_docids=full.passage_docids[ps],
        query_positive_docids=full.query_positive_docids[qs],
        query_keys=full.query_keys[qs],
    )
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
