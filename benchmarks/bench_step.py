"""Step-time breakdown of the real LANCER training step (``Trainer.train_step``), and loader rate vs trainer
consumption rate.

Run (2 CPU ranks, gloo, the quickstart config; the quickstart backbone and data must be built, e.g. by
scripts/quickstart.sh):

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/bench_step.py --config configs/quickstart.yaml --steps 12

Each measured step is one call of ``Trainer.train_step`` on the trainer's own stream (the code a run executes: the
configured path - plain, erasure-chunked or gradient-cached -, gradient clipping, optimizer, scheduler, metric
reduction). Its phases are read from timers attached to the trainer from outside, not from a copy of the step:
forward hooks on the encoder, step hooks on the optimizer, and wrappers on the trainer's loss, its collectives and
``accelerator.backward``. Prints rank 0's mean over the measured steps (after 2 warm-up steps): forward (every encoder
forward of the step), loss (L_R + L_C with the collectives they call), of which collectives (the gather of
cross-device negatives, the all-reduce of the erasure statistics, the docid gather), backward, optimizer, the rest
(device transfer, clipping, scheduler, metric all-reduce) and the step. Then the share of the erasure loss and its
all-reduce (forward + backward to the embeddings), timed on each step's own erasure embeddings right after the step,
and the TrainStream's tokenised batches/s (data.num_workers as configured) against the steps/s the trainer consumes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from lancer_dist import dist
from lancer_dist.config import load_config
from lancer_dist.data.stream import TrainStream
from lancer_dist.losses import erasure_loss
from lancer_dist.train.trainer import Trainer


class StepTimers:
    """Seconds spent in each phase during the current step (``take()`` returns them and starts over)."""

    def __init__(self) -> None:
        self.now: dict[str, float] = defaultdict(float)

    def wrap(self, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.now[key] += time.perf_counter() - t0

        return timed

    def take(self) -> dict[str, float]:
        out, self.now = dict(self.now), defaultdict(float)
        return out


class TimedCollectives:
    """The trainer's Collectives with every collective timed (delegates everything else)."""

    def __init__(self, inner: Any, timers: StepTimers):
        self._inner = inner
        for name in ("gather", "sum_with_grad", "sum_no_grad", "gather_strings"):
            setattr(self, name, timers.wrap("collectives", getattr(inner, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def instrument(
    tr: Trainer, timers: StepTimers, erasure_inputs: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Attach the timers to ``tr`` (instance attributes and module hooks; the Trainer's code is unchanged)."""
    encoder = tr.accelerator.unwrap_model(tr.model)
    started: list[float] = []
    encoder.register_forward_pre_hook(lambda m, a: started.append(time.perf_counter()))

    def forward_done(m: Any, a: Any, o: Any) -> None:
        timers.now["forward"] += time.perf_counter() - started.pop()

    encoder.register_forward_hook(forward_done)
    loss = timers.wrap("loss", tr._loss)

    def loss_keeping_erasure_inputs(q: Any, p: Any, x: Any, b: Any) -> Any:
        erasure_inputs.append((x.detach().to(tr.loss_dtype), b.erasure_languages))
        return loss(q, p, x, b)

    tr._loss = loss_keeping_erasure_inputs  # type: ignore[method-assign]
    tr.collectives = TimedCollectives(tr.collectives, timers)  # type: ignore[assignment]
    tr.accelerator.backward = timers.wrap("backward", tr.accelerator.backward)  # type: ignore[method-assign]
    # the torch optimizer's own step hooks (replacing ``step`` would upset the LR scheduler's bookkeeping)
    inner = getattr(tr.optimizer, "optimizer", tr.optimizer)
    if hasattr(inner, "register_step_pre_hook"):
        t_opt: list[float] = []
        inner.register_step_pre_hook(lambda *_: t_opt.append(time.perf_counter()))

        def optimizer_done(*_: Any) -> None:
            timers.now["optimizer"] += time.perf_counter() - t_opt.pop()

        inner.register_step_post_hook(optimizer_done)
    else:  # an optimizer without step hooks (DeepSpeed's): time its step method
        tr.optimizer.step = timers.wrap("optimizer", tr.optimizer.step)  # type: ignore[method-assign]


def erasure_seconds(tr: Trainer, x: torch.Tensor, langs: torch.Tensor) -> float:
    """L_C and its all-reduce, forward and backward to the embeddings, on one step's erasure embeddings."""
    x = x.clone().requires_grad_(True)
    t0 = time.perf_counter()
    loss = tr.cfg.loss
    lc = erasure_loss(
        x,
        langs,
        tr.num_languages,
        eps=loss.erasure_eps,
        sum_fn=dist.all_reduce_with_grad,
        form=loss.erasure_form,
    )
    torch.autograd.grad(lc, x)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, ["tracking.enabled=false", "probe.enabled=false", *args.overrides])
    tr = Trainer(cfg)
    world = dist.get_world_size()
    timers = StepTimers()
    erasure_inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
    instrument(tr, timers, erasure_inputs)
    rows: list[dict[str, float]] = []
    it = iter(tr.stream)
    for i in range(args.steps + 2):
        b = next(it)
        timers.take()
        erasure_inputs.clear()
        t0 = time.perf_counter()
        metrics = tr.train_step(b)
        step = time.perf_counter() - t0
        phases = timers.take()
        lc = sum(erasure_seconds(tr, x, langs) for x, langs in erasure_inputs if x.numel())
        if i >= 2:
            known = sum(phases.get(k, 0.0) for k in ("forward", "loss", "backward", "optimizer"))
            rows.append(
                {
                    **{
                        k: phases.get(k, 0.0)
                        for k in ("forward", "loss", "collectives", "backward", "optimizer")
                    },
                    "rest": step - known,
                    "step": step,
                    "step_time_s (logged)": metrics["step_time_s"],
                    "erasure": lc,
                }
            )
    mean = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
    if dist.is_main_process():
        print(
            f"world size {world}, {args.steps} steps of Trainer.train_step, mean step {mean['step'] * 1000:.1f} ms"
        )
        for k, v in mean.items():
            if k == "erasure":
                continue
            label = "  of which collectives" if k == "collectives" else k
            print(f"  {label:22s} {v * 1000:9.2f} ms  {100 * v / mean['step']:6.2f} %")
        print(
            f"  erasure loss + all-reduce (fwd + bwd, on the step's embeddings): {mean['erasure'] * 1000:.2f} ms, "
            f"{100 * mean['erasure'] / mean['step']:.2f} % of a step"
        )
    # loader alone, same config, same rank layout
    stream = TrainStream.from_config(cfg, tr.tokenizer, rank=dist.get_rank(), world_size=world)
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
            f"{1 / mean['step']:.2f} steps/s; ratio {rate * mean['step']:.1f}x"
        )


if __name__ == "__main__":
    main()
