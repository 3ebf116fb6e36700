"""``lancer submit slurm`` against a real SLURM (slurmctld + 2 emulated slurmd nodes) and a real MLflow server.

One 2-node CPU training job (torchrun per node, gloo, configs/tiny.yaml on the offline Bible data, two DataLoader
workers per rank):
* it is signalled for preemption mid-run the way SLURM does before a time limit (USR1 to the batch shell:
  ``scancel --signal=USR1 --batch``): the trainer checkpoints at that step (no loader worker dies) and exits 75, the
  script requeues the job, the job starts again, resumes from that very checkpoint and finishes;
* it logged to the MLflow server: one run, named after the job id, with every step's loss across the restart;
* it left checkpoints and a final model;
* a token in the submitting environment reached neither the sbatch script, the job log nor the MLflow params;
* the chained eval step (``--then eval``: ``--dependency=afterok``) ran after training, on the trained model.

Skips when SLURM is not installed (scripts/install_schedulers.sh installs it as root; CI does).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from tests.integration.trainrun import submit_slurm
from tests.servers import MlflowServer, SlurmCluster, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
TOKEN = "tok-Zq8x1-not-a-real-token"
STEPS = 60


@pytest.fixture(scope="module")
def mlflow(tmp_path_factory: pytest.TempPathFactory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as srv:
        yield srv


def _submit(args: list[str], env: dict[str, str]) -> dict[str, int]:
    ids, out = submit_slurm(args, env)
    assert "MLflow: experiment 'lancer-tiny'" in out, out
    return ids


def _wait_for(pred, timeout: float, what: str, on_fail=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{on_fail()}")


def test_two_node_training_preempted_requeued_resumed(
    tmp_path: Path, mlflow: MlflowServer, e5_small_model_dir: Path, bible_data: Path
):
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    logs = tmp_path / "slurm-logs"
    with SlurmCluster(tmp_path / "slurm") as slurm:
        env = dict(
            slurm.env,
            OMP_NUM_THREADS="1",
            MLFLOW_TRACKING_TOKEN=TOKEN,  # must never be written anywhere
            LANCER_RDZV_PORT=str(free_port()),  # the test's cluster shares the host with other test runs
            PYTHONPATH=str(REPO),
        )
        overrides = [
            f"model.tokenizer={e5_small_model_dir}",
            f"data.retrieval.path={bible_data / 'retrieval'}",
            f"data.erasure.path={bible_data / 'erasure'}",
            f"output_dir={run}",  # checkpoints go to <output_dir>/checkpoints by default
            f"train.steps={STEPS}",
            # DataLoader workers ON: a preemption signal must not kill them (the trainer would die, not checkpoint)
            "data.num_workers=2",
            "data.retrieval.queries_per_step=16",  # a slower step than the config's 4 queries
            "train.warmup_steps=1",
            "train.checkpoint.every=4",
            "probe.enabled=false",
            f"tracking.tracking_uri={mlflow.uri}",
            # For the chained eval step (training ignores the eval section).
            f"eval.collections=[{bible_data / 'eval' / 'multilingual_sampled'}]",
            "eval.baselines=[]",
            "eval.tsne_samples=0",
        ]
        launch = [
            "--config",
            "configs/tiny.yaml",
            "--nodes",
            "2",
            "--gpus-per-node",
            "0",
            "--log-dir",
            str(logs),
        ]
        ids = _submit([*launch, "--signal-seconds", "60", "--then", "eval", *overrides], env)
        assert set(ids) == {"train", "eval"}
        assert slurm.job(ids["eval"])["Dependency"].startswith(f"afterok:{ids['train']}")
        job = ids["train"]
        log = logs / f"lancer-{job}.out"
        script = next(logs.glob("lancer-train-*.sbatch")).read_text()
        assert TOKEN not in script and "--rdzv_backend=c10d" in script and "--signal=B:USR1@60" in script

        # Preempt once training is under way (a checkpoint exists), as SLURM does before the time limit.
        def done_ckpts() -> list[int]:  # complete checkpoints only (step-N.tmp is one being written)
            return [int(p.name[5:]) for p in ckpt.glob("step-*") if p.name[5:].isdigit()]

        _wait_for(lambda: bool(done_ckpts()), 300, "the first checkpoint", lambda: log.read_text()[-3000:])
        first_ckpt = max(done_ckpts())
        slurm.run(["scancel", "--signal=USR1", "--batch", str(job)])

        def requeued() -> bool:
            info = slurm.job(job)
            return int(info.get("Restarts", "0")) >= 1 and info.get("JobState") in (
                "PENDING",
                "RUNNING",
                "COMPLETED",
            )

        _wait_for(requeued, 180, "the requeue", lambda: log.read_text()[-3000:])
        # The requeued job waits out the credential lifetime (AuthInfo=cred_expire: 10 s on the test cluster,
        # 120 s by default) before it starts again.
        info = slurm.wait(job, timeout=400)
        text = log.read_text()
        assert info["JobState"] == "COMPLETED", f"{info}\n{text[-4000:]}"
        assert int(info["Restarts"]) == 1
        assert "lancer: preempted: requeueing" in text

        # The preemption itself wrote a checkpoint (not just the periodic ones) and the requeued job resumed from it.
        assert "killed by signal" not in text and "DataLoader worker" not in text, text[-4000:]
        # torchrun was never signalled (its "death signal" shutdown SIGKILLs the ranks 30 s later, whatever they do)
        assert "death signal" not in text, text[-4000:]
        preempted = [int(s) for s in re.findall(r"preempted at step (\d+); checkpoint saved", text)]
        resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]
        assert preempted and resumed and resumed[0] >= first_ckpt, text[-4000:]
        assert resumed[0] == preempted[0], (preempted, resumed)
        assert resumed[0] < STEPS, "preempted after the last step: the test did not exercise a resume"
        assert (ckpt / f"step-{STEPS:08d}").is_dir()
        assert (run / "final_model").is_dir()
        assert TOKEN not in text

        # The chained eval step ran after training succeeded, on the trained model (eval.lancer_model).
        ev = slurm.wait(ids["eval"], timeout=300)
        ev_log = (logs / f"lancer-eval-{ids['eval']}.out").read_text()
        assert ev["JobState"] == "COMPLETED", f"{ev}\n{ev_log[-4000:]}"
        assert ev["StartTime"] >= info["EndTime"]
        results = run / "eval" / "results.json"
        assert results.is_file() and "lancer" in results.read_text(), ev_log[-3000:]
        assert TOKEN not in ev_log

    # One MLflow run (named after the job id) holds every step, before and after the restart.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow.uri)
    exp = client.get_experiment_by_name("lancer-tiny")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.runName = 'tiny-{job}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    hist = client.get_metric_history(runs[0].info.run_id, "loss/total")
    steps = sorted({m.step for m in hist})
    assert steps == list(range(1, STEPS + 1)) or steps == list(range(STEPS)), steps
    params = runs[0].data.params
    assert params and all(TOKEN not in v for v in params.values())
    assert os.environ.get("MLFLOW_TRACKING_TOKEN") != TOKEN  # the test did not leak it into its own process
