"""Training on a Ray cluster with Ray Train: a ``TorchTrainer`` of N workers, each one rank of the lancer trainer.

``python -m launchers.ray_train --config FILE [key=value ...]`` is the entrypoint of the Ray job that
``lancer submit ray`` submits (launchers/ray_jobs.py); it runs on the head node as the job's driver:

* **driver** (:func:`fit`): loads and validates the config, builds the ``TorchTrainer`` from ``train.ray``
  (``num_workers``; ``cpus_per_worker`` / ``gpus_per_worker`` as each worker's resource request; ``placement``, the
  strategy of the placement group that holds the workers: PACK, SPREAD, STRICT_SPREAD = one worker per node; ...)
  and waits for it. The driver itself reserves nothing.
* **workers** (:func:`train_worker`): Ray Train starts N actors, creates the torch process group over them (gloo
  without GPUs, NCCL with) and sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT and
  ACCELERATE_TORCH_DEVICE in each. Each then runs the very trainer torchrun runs
  (:func:`lancer_dist.train.trainer.train`): Accelerate reads those variables, finds the group initialised and
  joins it (it only calls ``init_process_group`` when none exists; DeepSpeed's ``init_distributed`` likewise wraps
  the existing group), so DDP and DeepSpeed ZeRO sit on Ray Train's group. The global batch, the losses and the
  checkpoints are the same as under torchrun or SLURM with the same world size.
* **failure**: when a worker process or its node dies, Ray Train tears the group down and starts a new one
  (``train.ray.max_failures`` times). The new workers resume from the latest complete checkpoint in
  ``train.checkpoint.dir`` (``resume: auto``; checkpoints are written to ``*.tmp`` and renamed when complete) and
  continue the MLflow run whose id that checkpoint holds. So ``train.checkpoint.dir`` must be on storage every node
  sees (NFS, Lustre, ...): the driver refuses a relative path. Ray Train's own run state goes to
  ``train.ray.storage_path`` (a shared path or a URI such as ``s3://bucket/prefix``).
* **progress**: the trainer's log hook forwards the step metrics (every ``train.log_every`` steps, on every rank, as
  Ray Train requires) to ``ray.train.report``: the dashboard's Train view shows them. The trainer imports nothing
  from Ray.

Ray Train runs the training function in a thread of each worker actor and changes the actor's directory to a
per-run local directory; :func:`train_worker` changes it back to the job's packaged working directory on its node,
so the config path and relative paths in it (``train.deepspeed_config: cluster/deepspeed/zero2.json``) mean what
they mean for the driver and under torchrun.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lancer_dist.config import ConfigError, RayTrainConfig, RunConfig, load_config

__all__ = ["build_trainer", "fit", "main", "scaling_config", "train_worker", "worker_config"]

log = logging.getLogger("lancer.ray_train")

WorkerFn = Callable[[dict[str, Any]], None]


def scaling_config(rc: RayTrainConfig) -> Any:
    """Ray Train's ``ScalingConfig`` for ``train.ray``: one bundle of ``{CPU, GPU}`` per worker, placed together
    under ``rc.placement``."""
    from ray.train import ScalingConfig

    resources: dict[str, float] = {"CPU": rc.cpus_per_worker}
    if rc.gpus_per_worker:
        resources["GPU"] = rc.gpus_per_worker
    return ScalingConfig(
        num_workers=rc.num_workers,
        use_gpu=rc.gpus_per_worker > 0,
        resources_per_worker=resources,
        placement_strategy=rc.placement,
    )


def _checkpoint_dir(cfg: RunConfig) -> str:
    return cfg.train.checkpoint.dir or str(Path(cfg.output_dir) / "checkpoints")


def check_shared_paths(cfg: RunConfig) -> None:
    """Every worker (on any node) must write and find the same checkpoints and outputs: no relative paths."""
    for name, value in (("output_dir", cfg.output_dir), ("train.checkpoint.dir", _checkpoint_dir(cfg))):
        if not Path(value).is_absolute():
            raise ConfigError(
                name,
                value,
                "an absolute path on storage every Ray node sees (Ray Train workers on other nodes resume from it); "
                "`lancer submit ray` pins relative paths under the submitting directory",
            )


def _run_name(cfg: RunConfig) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "-", cfg.tracking.run_name or cfg.name)


def build_trainer(
    config: str,
    overrides: list[str],
    worker_fn: WorkerFn | None = None,
    extra: dict[str, Any] | None = None,
) -> Any:
    """The ``TorchTrainer`` for a config. ``worker_fn`` (default :func:`train_worker`) gets
    ``{"config": ..., "overrides": [...], "cwd": ..., **extra}``: only the config's path and the overrides travel (the
    dashboard shows them; credentials stay in the nodes' environment, expanded from ``${VAR}`` on each worker)."""
    from ray.train import FailureConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchTrainer

    cfg = load_config(config, overrides)
    check_shared_paths(cfg)
    rc = cfg.train.ray
    storage = rc.storage_path or str(Path(cfg.output_dir) / "ray_train")
    return TorchTrainer(
        worker_fn or train_worker,
        train_loop_config={
            "config": config,
            "overrides": list(overrides),
            "cwd": os.getcwd(),
            **(extra or {}),
        },
        scaling_config=scaling_config(rc),
        run_config=RayRunConfig(
            name=_run_name(cfg),
            storage_path=storage,
            failure_config=FailureConfig(max_failures=rc.max_failures),
        ),
    )


def fit(
    config: str,
    overrides: list[str],
    worker_fn: WorkerFn | None = None,
    extra: dict[str, Any] | None = None,
) -> Any:
    """Build the trainer and run it to the end (raises ``ray.train.TrainingFailedError`` when the workers failed
    more than ``max_failures`` times). Joins the Ray cluster the job runs in (``RAY_ADDRESS``) or starts a local
    one."""
    return build_trainer(config, overrides, worker_fn, extra).fit()


# ---- the workers ---------------------------------------------------------------------------------------------


def _working_dir(driver_cwd: str) -> Path:
    """This node's copy of the job's working directory. Ray unpacks a job's ``working_dir`` on every node into a
    directory named after its content hash (``.../_ray_pkg_<hash>``), starts each worker there and puts it first on
    PYTHONPATH (ray/_private/runtime_env/working_dir.py); Ray Train then changes the directory. Without a packaged
    working directory: the driver's (same host or a shared file system)."""
    name = Path(driver_cwd).name
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and Path(entry).name == name and Path(entry).is_dir():
            return Path(entry)
    return Path(driver_cwd)


def worker_config(loop: dict[str, Any]) -> RunConfig:
    """In a Ray Train worker: back to the job's working directory on this node, then the run config."""
    os.chdir(_working_dir(loop["cwd"]))
    return load_config(loop["config"], loop["overrides"])


def describe_worker() -> dict[str, Any]:
    """Where this worker runs: rank, world size, Ray node, pid (logged at start; tests read it back)."""
    import ray
    import ray.train

    ctx = ray.train.get_context()
    return {
        "rank": ctx.get_world_rank(),
        "world_size": ctx.get_world_size(),
        "local_rank": ctx.get_local_rank(),
        "node_rank": ctx.get_node_rank(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "pid": os.getpid(),
    }


def report_metrics(step: int, metrics: dict[str, float]) -> None:
    """The trainer's log hook under Ray Train: the step metrics to ``ray.train.report`` (dashboard progress)."""
    import ray.train

    ray.train.report({**metrics, "step": step})


def train_worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker: the lancer trainer on the process group Ray Train created."""
    from lancer_dist.train.trainer import train

    cfg = worker_config(loop)
    where = describe_worker()
    print(
        f"Ray Train worker rank {where['rank']}/{where['world_size']} on node {where['node_id']} "
        f"(node rank {where['node_rank']}, local rank {where['local_rank']}, pid {where['pid']})",
        file=sys.stderr,
        flush=True,
    )
    result = train(cfg, on_log=report_metrics)
    if where["rank"] == 0:
        if result.run_id:
            print(f"MLflow run {result.run_id} (experiment '{cfg.tracking.experiment}')", file=sys.stderr)
        print(f"final model: {result.final_model}", file=sys.stderr, flush=True)


# ---- the driver ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m launchers.ray_train",
        description="Run lancer training as a Ray Train TorchTrainer (the Ray job entrypoint of `lancer submit ray`).",
    )
    p.add_argument("--config", required=True, help="YAML run config (relative to the working directory)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        check_shared_paths(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rc = cfg.train.ray
    print(
        f"Ray Train: {rc.num_workers} workers x {{CPU: {rc.cpus_per_worker}, GPU: {rc.gpus_per_worker}}}, "
        f"placement {rc.placement}, max_failures {rc.max_failures}; checkpoints in {_checkpoint_dir(cfg)}",
        file=sys.stderr,
        flush=True,
    )
    result = fit(args.config, args.overrides)
    print(f"Ray Train finished: {result.metrics}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
