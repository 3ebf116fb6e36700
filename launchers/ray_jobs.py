"""Ray submission through the Ray Jobs API: training (Ray Train), encode and eval.

Training: the job's entrypoint is ``python -m launchers.ray_train --config FILE ...`` (launchers/ray_train.py), a
driver that runs a Ray Train ``TorchTrainer`` of ``train.ray.num_workers`` workers placed over the cluster's
nodes, each one rank of the lancer trainer; a dead worker restarts the group, which resumes from the latest
checkpoint. The driver reserves no resources (``--num-cpus`` / ``--num-gpus`` can make it); the workers reserve
``train.ray.cpus_per_worker`` / ``gpus_per_worker`` each. ``--workers`` / ``--cpus-per-worker`` /
``--gpus-per-worker`` are passed as those overrides. Encode / eval jobs run ``lancer encode|eval`` as the
entrypoint; they use the Ray cluster the job runs in for their own actor pools.

There is no torchrun inside a Ray job any more: it could only use the one node its entrypoint landed on, and Ray
Train gives the same trainer, the same process group semantics and the same checkpoints on any number of nodes.

The working directory is packaged (``runtime_env.working_dir``) without virtual environments, caches and run
outputs. Relative output paths of the config would land in Ray's temporary copy of that directory, so they are
made absolute (under the submitting directory, the shared file system) by overrides. Secrets never go into the
job's metadata (``runtime_env.env_vars`` and the entrypoint are visible in the dashboard): credentials belong in
the environment of the Ray nodes.
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lancer_dist.redact import redact

__all__ = [
    "DEFAULT_EXCLUDES",
    "TERMINAL",
    "RayJob",
    "client",
    "job_logs",
    "job_status",
    "stop_job",
    "submit",
    "wait",
]

DEFAULT_EXCLUDES = [
    ".venv",
    "venv",
    ".cache",
    "runs",
    "mlruns",
    "mlflow.db",
    "outputs",
    ".git",
    "**/__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    "*.egg-info",
    # anchored: Ray matches excludes like .gitignore lines, and a bare "data" also dropped lancer_dist/data/ from
    # the package (the job then imported whatever lancer_dist.data the node had installed, or failed)
    "/data",
    "/models",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
VERBS = ("train", "encode", "eval")


@dataclass
class RayJob:
    """One Ray job: ``verb`` (train / encode / eval) of lancer-dist with a config and overrides."""

    config: str
    verb: str = "train"
    overrides: list[str] = field(default_factory=list)
    # Ray Train workers and each one's resources (train); None = train.ray from the config.
    workers: int | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float | None = None
    # CPUs and GPUs the entrypoint (the job's driver process) reserves.
    num_cpus: float = 0
    num_gpus: float = 0
    working_dir: str = field(default_factory=os.getcwd)
    excludes: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDES))
    env: dict[str, str] = field(default_factory=dict)
    python: str = "python"
    submission_id: str | None = None
    # Replaces the program after ``python -m`` (for plumbing tests); default: see entrypoint().
    module_args: list[str] | None = None

    def validate(self) -> None:
        from launchers.slurm import SubmitError

        if self.verb not in VERBS:
            raise SubmitError("verb", self.verb, f"one of {', '.join(VERBS)}")
        if self.workers is not None and self.workers < 1:
            raise SubmitError("--workers", self.workers, "an integer >= 1")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise SubmitError("--cpus-per-worker", self.cpus_per_worker, "a number > 0")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise SubmitError("--gpus-per-worker", self.gpus_per_worker, "a number >= 0")
        if not Path(self.working_dir).is_dir():
            raise SubmitError("--working-dir", self.working_dir, "an existing directory")
        for item in [*self.overrides, *(f"{k}={v}" for k, v in self.env.items())]:
            if redact(item, env={}) != item:
                raise SubmitError(
                    "overrides/--env",
                    item,
                    "no credentials: Ray job metadata (runtime_env) is visible in the dashboard; set them in the "
                    "environment of the Ray nodes",
                )

    def all_overrides(self) -> list[str]:
        """The user's overrides, then the flags given as ``train.ray.*`` overrides (flags win)."""
        out = list(self.overrides)
        if self.verb == "train":
            for key, value in (
                ("num_workers", self.workers),
                ("cpus_per_worker", self.cpus_per_worker),
                ("gpus_per_worker", self.gpus_per_worker),
            ):
                if value is not None:
                    out.append(f"train.ray.{key}={value}")
        return out


def _config_rel(job: RayJob) -> str:
    """The config path as the job sees it: relative to the packaged working dir when it lies inside it."""
    cfg = Path(job.config).resolve()
    wd = Path(job.working_dir).resolve()
    try:
        return str(cfg.relative_to(wd))
    except ValueError:
        return str(cfg)  # outside the package: must be on a shared file system


def _absolute_outputs(job: RayJob) -> list[str]:
    """Overrides that pin the config's relative output paths to the submitting directory (see module doc)."""
    from lancer_dist.config import load_config

    cfg = load_config(job.config, job.all_overrides())
    wd = Path(job.working_dir).resolve()
    given = {o.split("=", 1)[0] for o in job.overrides}
    out = []
    for key, value in (("output_dir", cfg.output_dir), ("train.checkpoint.dir", cfg.train.checkpoint.dir)):
        if value and not Path(value).is_absolute() and key not in given:
            out.append(f"{key}={wd / value}")
    return out


def entrypoint(job: RayJob) -> str:
    job.validate()
    py = shlex.quote(job.python)
    if job.module_args is not None:
        return f"{py} -m {shlex.join(job.module_args)}"
    args = ["--config", _config_rel(job), *job.all_overrides(), *_absolute_outputs(job)]
    if job.verb == "train":
        return f"{py} -m {shlex.join(['launchers.ray_train', *args])}"
    return f"{py} -m {shlex.join(['lancer_dist.cli', job.verb, *args])}"


def _gpus_used(job: RayJob) -> float:
    if job.verb != "train":
        return job.num_gpus
    from lancer_dist.config import load_config

    return job.num_gpus + load_config(job.config, job.all_overrides()).train.ray.gpus_per_worker


def runtime_env(job: RayJob) -> dict[str, Any]:
    from lancer_dist.paths import cache_dir

    env = {
        # The offline model and data live in the submitter's cache (shared file system), not in the package.
        "LANCER_CACHE": str(cache_dir().resolve()),
        "PYTHONUNBUFFERED": "1",
        # Ray folds log lines that differ only in their numbers ("rank 0/2" / "rank 1/2", two ranks' losses) into
        # "[repeated Nx across cluster]" in the job log: every rank's lines are kept instead.
        "RAY_DEDUP_LOGS": "0",
    }
    if _gpus_used(job) == 0:
        # CPU training and its process group are gloo; nothing may pick up a GPU by accident.
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    env.update(job.env)
    return {
        "working_dir": str(Path(job.working_dir).resolve()),
        "excludes": list(job.excludes),
        "env_vars": env,
    }


def client(address: str) -> Any:
    """A JobSubmissionClient for the Ray dashboard at ``address`` (``http://HOST:8265``)."""
    from ray.job_submission import JobSubmissionClient

    if "://" not in address:
        address = "http://" + address
    return JobSubmissionClient(address)


def submit(address: str, job: RayJob) -> str:
    """Submit ``job``; returns the Ray submission id."""
    kwargs: dict[str, Any] = {
        "entrypoint": entrypoint(job),
        "runtime_env": runtime_env(job),
        "metadata": {"lancer_verb": job.verb, "lancer_config": _config_rel(job)},
    }
    if job.num_cpus:
        kwargs["entrypoint_num_cpus"] = job.num_cpus
    if job.num_gpus:
        kwargs["entrypoint_num_gpus"] = job.num_gpus
    if job.submission_id:
        kwargs["submission_id"] = job.submission_id
    return str(client(address).submit_job(**kwargs))


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


def job_status(address: str, job_id: str) -> str:
    return _status_name(client(address).get_job_status(job_id))


def job_logs(address: str, job_id: str) -> str:
    return redact(str(client(address).get_job_logs(job_id)))


def stop_job(address: str, job_id: str) -> bool:
    return bool(client(address).stop_job(job_id))


def wait(address: str, job_id: str, timeout: float = 3600.0, poll: float = 1.0) -> str:
    """Poll until the job is SUCCEEDED / FAILED / STOPPED; returns that status."""
    c = client(address)
    deadline = time.monotonic() + timeout
    status = ""
    while time.monotonic() < deadline:
        status = _status_name(c.get_job_status(job_id))
        if status in TERMINAL:
            return status
        time.sleep(poll)
    raise TimeoutError(f"Ray job {job_id} still {status} after {timeout} s")
