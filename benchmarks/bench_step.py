"""Step-time breakdown of the LANCER multi-task step, and loader rate vs trainer consumption rate.

Run (2 CPU ranks, gloo, the quickstart config; the quickstart backbone and data must be built, e.g. by
scripts/quickstart.sh):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/bench_step.py --config configs/quickstart.yaml --steps 12

Prints, per phase, the mean time over the measured steps (after 2 warm-up steps), rank 0's view:
forward (the one multi-task encoder forward), gather (cross-device negatives), retrieval loss, erasure loss +
its all-reduce (forward, and its backward w.r.t. the embeddings), backward (everything), optimizer. Then the
TrainStream's tokenised batches/s (data.num_workers as configured) against the steps/s the trainer consumes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lancer_dist import dist
from lancer_dist.config import load_config
from lancer_dist.data.stream import TrainStream
from lancer_dist.losses import contrastive_loss, erasure_loss, group_positive_index
from lancer_dist.train.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, ["tracking.enabled=false", "probe.enabled=false", *args.overrides])
    tr = Trainer(cfg)
    model, g = tr.model, cfg.data.retrieval.group_size
    world = dist.get_world_size()
    phases: dict[str, list[float]] = {
        k: []
        for k in (
            "forward",
            "gather",
            "retrieval_loss",
            "erasure_loss_fwd",
            "erasure_loss_bwd",
            "backward",
            "optimizer",
            "step",
        )
    }
    it = iter(tr.stream)
    for i in range(args.steps + 2):
        b = next(it)
        t0 = time.perf_counter()
        q, p, x = model(
            b.query_input_ids,
            b.query_attention_mask,
            b.passage_input_ids,
            b.passage_attention_mask,
            b.erasure_input_ids,
            b.erasure_attention_mask,
        )
        t1 = time.perf_counter()
        p_all, off = dist.gather_with_grad(p)
        t2 = time.perf_counter()
        n_global = int(dist.all_reduce_sum(torch.tensor([float(q.shape[0])]))[0])
        lr = contrastive_loss(
            q,
            p_all,
            group_positive_index(q.shape[0], g, off, q.device),
            temperature=cfg.model.temperature,
            reduction="sum",
        ) * (world / n_global)
        t3 = time.perf_counter()
        lc = erasure_loss(x, b.erasure_languages, tr.num_languages, sum_fn=dist.all_reduce_with_grad)
        t4 = time.perf_counter()
        # the erasure loss's own backward (down to the embeddings), measured separately
        torch.autograd.grad(lc, x, retain_graph=True)
        t5 = time.perf_counter()
        tr.accelerator.backward(lr + cfg.loss.erasure_weight * lc)
        t6 = time.perf_counter()
        tr.optimizer.step()
        tr.scheduler.step()
        tr.optimizer.zero_grad(set_to_none=True)
        t7 = time.perf_counter()
        if i >= 2:
            for k, v in zip(
                phases,
                (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5, t7 - t6, t7 - t0 - (t5 - t4)),
                strict=True,
            ):
                phases[k].append(v)
    step = statistics.mean(phases["step"])
    if dist.is_main_process():
        print(f"world size {world}, {args.steps} steps, mean step {step * 1000:.1f} ms")
        for k, v in phases.items():
            m = statistics.mean(v)
            print(f"  {k:18s} {m * 1000:9.2f} ms  {100 * m / step:6.2f} %")
        er = statistics.mean(phases["erasure_loss_fwd"]) + statistics.mean(phases["erasure_loss_bwd"])
        print(f"  erasure loss + all-reduce (fwd + bwd): {100 * er / step:.2f} % of a step")
    # loader alone, same config, same rank layout
    stream = TrainStream(cfg, tr.tokenizer, rank=dist.get_rank(), world_size=world)
    n = min(cfg.train.steps, 3 * args.steps)
    sit = iter(stream)
    next(sit)  # start-up (worker spawn, first shard reads) is not the steady rate
    t0 = time.perf_counter()
    for _ in range(n - 1):
        next(sit)
    rate = (n - 1) / (time.perf_counter() - t0)
    if dist.is_main_process():
        print(
            f"loader: {rate:.2f} batches/s (num_workers={cfg.data.num_workers}); trainer consumes "
            f"{1 / step:.2f} steps/s; ratio {rate * step:.1f}x"
        )


if __name__ == "__main__":
    main()
