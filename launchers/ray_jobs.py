"""Ray submission through the Ray Jobs API: training (torchrun inside a Ray job), encode and eval.

Training runs as ``python -m torch.distributed.run --standalone --nproc_per_node P -m lancer_dist.cli train ...``
inside one Ray job whose entrypoint reserves the job's CPUs / GPUs (``entrypoint_num_cpus`` / ``entrypoint_num_gpus``)
so Ray places it on a node that has them. Why torchrun and not Ray Train's TorchTrainer: the trainer is then the
very same program under SLURM, torchrun and Ray - same process group set-up, same checkpoints, same preemption
exit code, no Ray-specific code path to keep exact - and ``resume: auto`` already gives what Ray Train's
checkpoint handling would. The cost: one node per Ray training job (multi-node training is the SLURM launcher's, or
a torchrun per node started by the user). Encode / eval jobs use Ray inside the job themselves (``lancer encode``
starts its own actor pool on the cluster the job runs in).

The working directory is packaged (``runtime_env.working_dir``) without virtual environments, caches and run
outputs. Relative output paths of the config would land in Ray's temporary copy of that directory, so they are
made absolute (under the submitting directory, the shared file system) by overrides. Secrets never go into the
job's metadata (``runtime_env.env_vars`` is visible in the dashboard): credentials belong in the environment of
the Ray nodes.
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
    "data",
    "models",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
VERBS = ("train", "encode", "eval")


@dataclass
class RayJob:
    """One Ray job: ``verb`` (train / encode / eval) of lancer-dist with a config and overrides."""

    config: str
    verb: str = "train"
    overrides: list[str] = field(default_factory=list)
    # torchrun processes for training; CPUs and GPUs the entrypoint reserves.
    nproc: int = 1
    num_cpus: float | None = None
    num_gpus: float = 0
    working_dir: str = field(default_factory=os.getcwd)
    excludes: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDES))
    env: dict[str, str] = field(default_factory=dict)
    python: str = "python"
    submission_id: str | None = None
    # Replaces the program after ``python -m`` (for plumbing tests); default lancer_dist.cli <verb> ...
    module_args: list[str] | None = None

    def validate(self) -> None:
        from launchers.slurm import SubmitError

        if self.verb not in VERBS:
            raise SubmitError("verb", self.verb, f"one of {', '.join(VERBS)}")
        if self.nproc < 1:
            raise SubmitError("--nproc", self.nproc, "an integer >= 1")
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

    cfg = load_config(job.config, job.overrides)
    wd = Path(job.working_dir).resolve()
    given = {o.split("=", 1)[0] for o in job.overrides}
    out = []
    for key, value in (("output_dir", cfg.output_dir), ("train.checkpoint.dir", cfg.train.checkpoint.dir)):
        if value and not Path(value).is_absolute() and key not in given:
            out.append(f"{key}={wd / value}")
    return out


def entrypoint(job: RayJob) -> str:
    job.validate()
    if job.module_args is not None:
        prog = list(job.module_args)
    else:
        prog = [
            "lancer_dist.cli",
            job.verb,
            "--config",
            _config_rel(job),
            *job.overrides,
            *_absolute_outputs(job),
        ]
    py = shlex.quote(job.python)
    if job.verb == "train":
        # --standalone: a private rendezvous on a free local port, so concurrent jobs on one node never clash;
        # launchers.local_torchrun keeps its stores on 127.0.0.1 (torchrun's own listen on every interface).
        launcher = f"{py} -m launchers.local_torchrun --standalone --nproc_per_node={job.nproc}"
        return f"{launcher} -m {shlex.join(prog)}"
    return f"{py} -m {shlex.join(prog)}"


def runtime_env(job: RayJob) -> dict[str, Any]:
    from lancer_dist.paths import cache_dir

    env = {
        # The offline model and data live in the submitter's cache (shared file system), not in the package.
        "LANCER_CACHE": str(cache_dir().resolve()),
        "PYTHONUNBUFFERED": "1",
    }
    if job.num_gpus == 0:
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
    cpus = job.num_cpus if job.num_cpus is not None else float(job.nproc if job.verb == "train" else 0)
    if cpus:
        kwargs["entrypoint_num_cpus"] = cpus
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
