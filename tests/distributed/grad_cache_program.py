"""Run under torchrun (N ranks) or plainly: one real ``Trainer.train_step`` with gradient caching and dropout ON,
(or with micro-batched erasure, ``loss.erasure_chunk``) against an independent reference on the same rank's share of
the same global batch.

The reference keeps the whole graph: every chunk is encoded WITH autograd in the order the cached pass uses (so
each chunk draws the same dropout masks from the same RNG stream), the global-batch loss is back-propagated once,
the gradients are averaged over ranks (what DDP / DeepSpeed do), and one AdamW step is taken. Gradient caching is
exact iff the trainer's parameters after its step equal the reference's.

Also measured, so the test cannot pass vacuously: how much two train-mode forwards of the same input differ
(0 if dropout were off). ``sabotage`` turns the RNG replay off (each re-forward draws fresh masks): the test
expects a difference far above the tolerance then.

Writes ``<out>/rank<r>.json``: {"dropout_diff", "max_param_diff", "loss"}.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from lancer_dist import dist
from lancer_dist.config import load_config
from lancer_dist.data.stream import TrainStream
from lancer_dist.model import BiEncoder
from lancer_dist.train import parallel
from lancer_dist.train.trainer import Trainer, _chunks, _encode_chunk, build_optimizer


def main(config: str, out: str, sabotage: str = "") -> None:
    cfg = load_config(config)
    tr = Trainer(cfg)
    full = next(iter(TrainStream.from_config(cfg, tr.tokenizer, rank=0, world_size=1)))
    r, w = tr.rank, tr.world
    b = full.shard(r, w).to(tr.device)
    model = tr.accelerator.unwrap_model(tr.model)
    ref = BiEncoder.from_config(cfg.model).to(dtype=next(model.parameters()).dtype, device=tr.device)
    ref.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    before = {k: v.detach().clone() for k, v in ref.named_parameters()}
    ref.train()
    model.train()

    # dropout must be on: two train-mode forwards of the same passages differ
    with torch.no_grad():
        e1 = _encode_chunk(model, b.passage_input_ids, b.passage_attention_mask, False)
        e2 = _encode_chunk(model, b.passage_input_ids, b.passage_attention_mask, False)
    dropout_diff = float((e1 - e2).abs().max())

    # the reference: the whole graph, chunk by chunk in the cached pass's order, one backward, rank average
    # without caching, the plain step encodes queries, passages, erasure passages in that order: one chunk each
    # with loss.erasure_chunk (no gradient caching) the step encodes the erasure passages first, in micro-batches
    size = cfg.train.grad_cache_chunk_size or 10**9
    seed = 1000 + r
    torch.manual_seed(seed)
    inputs = [
        ("q", b.query_input_ids, b.query_attention_mask, True, size),
        ("p", b.passage_input_ids, b.passage_attention_mask, False, size),
        ("x", b.erasure_input_ids, b.erasure_attention_mask, False, cfg.loss.erasure_chunk or size),
    ]
    if cfg.loss.erasure_chunk:
        inputs = inputs[2:] + inputs[:2]
    embs = {
        key: torch.cat([_encode_chunk(ref, ids[sl], mask[sl], is_q) for sl in _chunks(ids.shape[0], chunk)])
        for key, ids, mask, is_q, chunk in inputs
    }
    ref_out = tr._loss(embs["q"], embs["p"], embs["x"], b)
    ref_out.loss.backward()
    for p in ref.parameters():
        if p.grad is not None:
            if cfg.train.strategy == "deepspeed":  # DeepSpeed reduces gradients in float32
                p.grad = (dist.all_reduce_sum(p.grad.float()) / w).to(p.dtype)
            else:
                p.grad = dist.all_reduce_sum(p.grad) / w
    ref_dtype = next(ref.parameters()).dtype
    if cfg.train.strategy == "deepspeed":
        # DeepSpeed ZeRO keeps fp32 master weights and gradients whatever the model dtype (there is no fp64
        # option): the optimizer steps fp32 copies, which are copied back into the model. Do the same.
        master = BiEncoder.from_config(cfg.model).to(device=tr.device, dtype=torch.float32)
        master.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
        for (_, mp), (_, rp) in zip(master.named_parameters(), ref.named_parameters(), strict=True):
            mp.grad = None if rp.grad is None else rp.grad.float()
        build_optimizer(master, cfg).step()
        ref.load_state_dict({k: v.to(ref_dtype) for k, v in master.state_dict().items()})
    else:
        build_optimizer(ref, cfg).step()

    if sabotage:
        parallel.RngState.restore = lambda self: None  # type: ignore[method-assign]
    torch.manual_seed(seed)
    metrics = tr.train_step(b)

    got = dict(model.named_parameters())
    if cfg.train.strategy == "deepspeed" and cfg.train.zero_stage == 3:
        raise SystemExit("ZeRO-3 parameters are partitioned: not compared here")
    diffs = {n: float((got[n].detach() - p.detach()).abs().max()) for n, p in ref.named_parameters()}
    diff = max(diffs.values())
    # relative error of the whole update (robust to Adam's amplification of float32 noise in near-zero gradients)
    num = sum(float((got[n].detach() - p.detach()).pow(2).sum()) for n, p in ref.named_parameters())
    den = sum(float((p.detach() - before[n]).pow(2).sum()) for n, p in ref.named_parameters())
    rel = (num / den) ** 0.5
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, f"rank{r}.json").write_text(
        json.dumps(
            {
                "dropout_diff": dropout_diff,
                "max_param_diff": diff,
                "loss": metrics["loss/total"],
                "ref_loss": float(ref_out.total),
                "rel_update_err": rel,
            }
        )
    )
    dist.shutdown()  # a last barrier, then the group is destroyed before the interpreter exits


if __name__ == "__main__":
    main(*sys.argv[1:])
