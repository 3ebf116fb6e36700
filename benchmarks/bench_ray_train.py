"""Overhead of Ray Train against torchrun on the same 2-process CPU training job.

    flock /tmp/lancer-ray.lock python benchmarks/bench_ray_train.py [--short 10 --long 40 --repeats 1]

Both run the real trainer (``lancer train``: configs/tiny.yaml on the small offline Bible data, DDP over gloo,
2 processes x 1 thread, MLflow to a local sqlite store, a checkpoint at the end):

* torchrun: ``python -m torch.distributed.run --standalone --nproc_per_node 2 -m lancer_dist.cli train ...``,
  timed from start to exit;
* Ray Train: ``launchers.ray_train.fit`` (what ``lancer submit ray`` runs in its job) with 2 workers x 1 CPU on a
  local Ray instance started once beforehand (a cluster is normally up already; its start-up is printed apart),
  timed from ``fit()`` to its return; the trainer also reports every step's metrics through ``ray.train.report``.

Each launcher runs ``--short`` and ``--long`` steps; ``(T_long - T_short) / (long - short)`` is the per-step cost
without start-up, ``T_short - short x per-step`` the fixed cost (process start, process group, model, data,
final checkpoint). Printed: both, and the Ray / torchrun ratios. The machine is shared: ``uptime`` is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


LOG_EVERY = 1


def _overrides(out: Path, data: Path, steps: int) -> list[str]:
    return [
        f"train.log_every={LOG_EVERY}",
        f"output_dir={out}",
        f"train.checkpoint.dir={out / 'checkpoints'}",
        f"tracking.tracking_uri=sqlite:///{out / 'mlflow.db'}",
        f"data.retrieval.path={data / 'retrieval'}",
        f"data.erasure.path={data / 'erasure'}",
        f"train.steps={steps}",
        "train.checkpoint.every=0",
        "train.checkpoint.resume=never",
        "train.warmup_steps=0",
        "probe.enabled=false",
        "train.ray.num_workers=2",
        "train.ray.cpus_per_worker=1",
    ]


def run_torchrun(out: Path, data: Path, steps: int) -> float:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "lancer_dist.cli", "train", "--config", "configs/tiny.yaml", *_overrides(out, data, steps),
    ]  # fmt: skip
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"torchrun failed:\n{r.stderr[-4000:]}")
    return dt


def run_ray_train(out: Path, data: Path, steps: int) -> float:
    from launchers.ray_train import fit

    t0 = time.perf_counter()
    fit("configs/tiny.yaml", _overrides(out, data, steps))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--short", type=int, default=10)
    ap.add_argument("--long", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=1, help="runs per (launcher, steps); the minimum is kept")
    ap.add_argument(
        "--log-every", type=int, default=1, help="train.log_every (= steps between ray.train.report)"
    )
    args = ap.parse_args()
    global LOG_EVERY
    LOG_EVERY = args.log_every
    os.chdir(REPO)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

    from lancer_dist.offline import ensure_bible_data
    from lancer_dist.paths import cache_dir
    from tests.conftest import TEST_BIBLE_OPTIONS

    data = ensure_bible_data(cache_dir() / "data" / "bible-test", **TEST_BIBLE_OPTIONS)
    print("load before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())

    import ray

    tmp = Path(tempfile.mkdtemp(prefix="lbench", dir="/tmp"))
    t0 = time.perf_counter()
    ray.init(
        address="local",  # a new instance: never attach to a cluster `ray start` left on this host
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 1024**2,
        _temp_dir=str(tmp / "ray"),
        runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], "OMP_NUM_THREADS": "1"}},
    )
    ray_start = time.perf_counter() - t0
    times: dict[tuple[str, int], float] = {}
    try:
        for rep in range(args.repeats):
            for steps in (args.short, args.long):
                for name, fn in (("torchrun", run_torchrun), ("ray_train", run_ray_train)):
                    out = tmp / f"{name}-{steps}-{rep}"
                    dt = fn(out, data, steps)
                    shutil.rmtree(out, ignore_errors=True)
                    times[(name, steps)] = min(dt, times.get((name, steps), float("inf")))
                    print(f"{name:9s} {steps:3d} steps: {dt:6.1f} s", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    n = args.long - args.short
    res = {}
    for name in ("torchrun", "ray_train"):
        per_step = (times[(name, args.long)] - times[(name, args.short)]) / n
        fixed = times[(name, args.short)] - args.short * per_step
        res[name] = (per_step, fixed, times[(name, args.long)])
    print(f"\nRay local instance start-up (not in the Ray Train times): {ray_start:.1f} s")
    print(f"| launcher | per step (s) | fixed cost (s) | total, {args.long} steps (s) |")
    print("|---|---|---|---|")
    for name, (per_step, fixed, total) in res.items():
        print(f"| {name} | {per_step:.3f} | {fixed:.1f} | {total:.1f} |")
    (tp, tf, tt), (rp, rf, rt) = res["torchrun"], res["ray_train"]
    print(
        f"\nRay Train / torchrun: per step {rp / tp:.2f}x, fixed cost {rf / tf:.2f}x, total ({args.long} steps) {rt / tt:.2f}x"
    )
    print("load after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
