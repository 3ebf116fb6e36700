"""``lancer submit ray`` against a real 2-node Ray cluster (head + worker on this host) through the Ray Jobs API.

* training: Ray Train with 2 workers (``--workers 2 --cpus-per-worker 1``) in a Ray job, the working directory
  packaged (no .venv/.cache/runs), on the tiny config and the offline Bible data; it leaves checkpoints, a final
  model and an MLflow run; ``lancer submit ray status|logs`` report on it;
* a long training job is stopped with ``lancer submit ray stop``: the job and its Ray Train workers end;
* evaluation: ``lancer eval`` as a Ray job on the trained model (skips while the eval verb is not in this build).

Skips when Ray is not installed.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launchers import ray_jobs
from tests.servers import RayCluster

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STEPS = 4


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    with RayCluster(tmp_path_factory.mktemp("ray")) as cluster:
        yield cluster


def _lancer(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-m", "launchers.cli", *args],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:  # say what the job was doing, not only that it took too long
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        m = re.search(r"Ray job (\S+)", out)
        address = args[args.index("--address") + 1] if "--address" in args else ""
        logs = ray_jobs.job_logs(address, m.group(1))[-6000:] if m and address else "(no job id)"
        from ray.util.state import list_actors

        actors = [
            f"{a.class_name} {a.state} pid={a.pid} node={a.node_id}"
            for a in list_actors(address=address, raise_on_missing_output=False, limit=200)
            if a.state != "DEAD"
        ]
        pytest.fail(
            f"`lancer {' '.join(args[:3])}` ran past {timeout} s; stdout:\n{out}\njob log:\n{logs}\n"
            f"live actors: {actors}"
        )


def _data_overrides(run: Path, model_dir: Path, bible: Path) -> list[str]:
    return [
        f"model.tokenizer={model_dir}",
        f"data.retrieval.path={bible / 'retrieval'}",
        f"data.erasure.path={bible / 'erasure'}",
        f"output_dir={run}",
        f"train.checkpoint.dir={run / 'checkpoints'}",
        f"tracking.tracking_uri=sqlite:///{run.parent / 'mlflow.db'}",
        "probe.enabled=false",
    ]


@pytest.fixture(scope="module")
def trained(
    ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory, e5_small_model_dir, bible_data
):
    """A Ray training job (2 Ray Train workers) run to completion; returns (job id, run dir)."""
    run = tmp_path_factory.mktemp("ray-train") / "run"
    r = _lancer(
        "submit", "ray", "--address", ray_cluster.dashboard_url, "--config", "configs/tiny.yaml",
        "--workers", "2", "--cpus-per-worker", "1", "--wait",
        f"train.steps={STEPS}", "train.checkpoint.every=2", *_data_overrides(run, e5_small_model_dir, bible_data),
    )  # fmt: skip
    m = re.search(r"submitted train: Ray job (\S+)", r.stdout)
    assert m, r.stdout + r.stderr
    job_id = m.group(1)
    assert r.returncode == 0, (
        r.stdout + r.stderr + ray_jobs.job_logs(ray_cluster.dashboard_url, job_id)[-4000:]
    )
    return job_id, run


def test_ray_training_job(ray_cluster: RayCluster, trained: tuple[str, Path]):
    job_id, run = trained
    assert (run / "checkpoints" / f"step-{STEPS:08d}").is_dir()
    assert (run / "final_model").is_dir()

    r = _lancer("submit", "ray", "status", job_id, "--address", ray_cluster.dashboard_url)
    assert r.returncode == 0 and r.stdout.strip() == "SUCCEEDED", r.stdout + r.stderr
    r = _lancer("submit", "ray", "logs", job_id, "--address", ray_cluster.dashboard_url)
    assert r.returncode == 0
    # Two ranks ran (Ray Train workers) and the code came from the packaged working directory.
    assert "[rank1]" in r.stdout and "final model" in r.stdout, r.stdout[-3000:]
    assert "Ray Train worker rank 1/2" in r.stdout, r.stdout[-3000:]
    info = ray_jobs.client(ray_cluster.dashboard_url).get_job_info(job_id)
    assert info.runtime_env["working_dir"].startswith(("gcs://", "_ray_pkg")), info.runtime_env

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run.parent / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lancer-tiny")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    assert len({m.step for m in client.get_metric_history(runs[0].info.run_id, "loss/total")}) == STEPS


def test_ray_stop(ray_cluster: RayCluster, tmp_path: Path, e5_small_model_dir, bible_data):
    run = tmp_path / "run"
    from ray.util.state import list_actors

    job = ray_jobs.RayJob(
        config=str(REPO / "configs/tiny.yaml"),
        workers=1,
        cpus_per_worker=1,
        working_dir=str(REPO),
        overrides=["train.steps=100000", *_data_overrides(run, e5_small_model_dir, bible_data)],
    )
    job_id = ray_jobs.submit(ray_cluster.dashboard_url, job)
    deadline = time.monotonic() + 300
    while not (ray_job := ray_jobs.client(ray_cluster.dashboard_url).get_job_info(job_id).job_id):
        assert time.monotonic() < deadline, "the job's driver never started"
        time.sleep(0.5)  # the Ray job id is known once the driver runs

    def workers(state: str) -> list:
        actors = list_actors(
            address=ray_cluster.dashboard_url,
            filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", state)],
            raise_on_missing_output=False,
        )
        return [a for a in actors if a.job_id == ray_job]

    deadline = time.monotonic() + 300
    while not workers("ALIVE"):  # the training worker runs
        assert ray_jobs.job_status(ray_cluster.dashboard_url, job_id) not in ray_jobs.TERMINAL
        assert time.monotonic() < deadline, "no Ray Train worker started"
        time.sleep(0.5)
    r = _lancer("submit", "ray", "stop", job_id, "--address", ray_cluster.dashboard_url)
    assert r.returncode == 0 and r.stdout.strip() == "stopped", r.stdout + r.stderr
    assert ray_jobs.wait(ray_cluster.dashboard_url, job_id, timeout=120) == "STOPPED"
    deadline = time.monotonic() + 60
    while workers("ALIVE") and time.monotonic() < deadline:  # the job's workers go with it
        time.sleep(0.5)
    assert not workers("ALIVE")


def test_ray_eval_job(ray_cluster: RayCluster, trained: tuple[str, Path], bible_data: Path):
    from lancer_dist.cli import build_parser

    verbs = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    if "eval" not in verbs:
        pytest.skip("`lancer eval` is not part of this build yet (issue 5)")
    _, run = trained
    out = run.parent / "eval"
    # The entrypoint reserves no CPU (the default for eval): the evaluator's encoder actors and search tasks use
    # the cluster's CPUs through the Ray connection the job provides.
    r = _lancer(
        "submit", "ray", "--address", ray_cluster.dashboard_url, "--config", "configs/tiny.yaml", "--verb", "eval",
        "--wait",
        f"model.tokenizer={run / 'final_model'}", f"eval.model={run / 'final_model'}",
        f"eval.collections=[{bible_data / 'eval' / 'multilingual_sampled'}]", "eval.baselines=[]",
        "eval.tsne_samples=0", f"eval.output_dir={out}", f"output_dir={out}",
        f"tracking.tracking_uri=sqlite:///{run.parent / 'mlflow.db'}", "eval.worker_start_timeout_s=120",
        timeout=300,
    )  # fmt: skip
    m = re.search(r"submitted eval: Ray job (\S+)", r.stdout)
    assert m, r.stdout + r.stderr
    logs = ray_jobs.job_logs(ray_cluster.dashboard_url, m.group(1))
    assert r.returncode == 0, logs[-4000:]
    assert "nDCG@10" in logs and "| base |" in logs, logs[-3000:]
    assert (out / "results.json").is_file()
