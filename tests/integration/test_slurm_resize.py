"""A SLURM training job stopped on 2 nodes and resubmitted with ``--nodes 1`` resumes from the 2-rank checkpoint
(real slurmctld + 2 emulated slurmd nodes, ``lancer submit slurm``, configs/tiny.yaml in float64) and ends with the
weights of a one-process run of the same config (fp64, 1e-10).

Skips when SLURM is not installed. Run under ``flock /tmp/lancer-slurm.lock`` on a shared machine."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.integration.trainrun import check, run_group, submit_slurm
from tests.servers import SlurmCluster, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
STEPS = 6


def test_job_resubmitted_on_fewer_nodes_resumes(
    tmp_path: Path, e5_small_model_dir: Path, bible_data: Path
) -> None:
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    logs = tmp_path / "slurm-logs"
    overrides = [
        f"model.tokenizer={e5_small_model_dir}",
        f"data.retrieval.path={bible_data / 'retrieval'}",
        f"data.erasure.path={bible_data / 'erasure'}",
        f"output_dir={run}",
        f"train.checkpoint.dir={ckpt}",
        f"train.steps={STEPS}",
        "train.precision=fp64",
        "train.checkpoint.every=2",
        "train.checkpoint.keep_last=4",
        "probe.enabled=false",
        "tracking.enabled=false",
    ]
    with SlurmCluster(tmp_path / "slurm") as slurm:
        env = dict(slurm.env, OMP_NUM_THREADS="1", LANCER_RDZV_PORT=str(free_port()), PYTHONPATH=str(REPO))
        launch = ["--config", "configs/tiny.yaml", "--gpus-per-node", "0", "--log-dir", str(logs)]
        first = submit_slurm([*launch, "--nodes", "2", *overrides], env)[0]["train"]
        deadline = time.monotonic() + 600
        while not (ckpt / "step-00000002" / "trainer_state.json").is_file():
            info = slurm.job(first)
            assert info.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), info
            assert time.monotonic() < deadline, (logs / f"lancer-{first}.out").read_text()[-3000:]
            time.sleep(0.5)
        # the allocation is lost: SIGKILL to the batch shell and every step (no checkpoint-and-requeue path)
        slurm.run(["scancel", "--signal=KILL", "--full", str(first)])
        slurm.wait(first, timeout=180)
        assert not (run / "final_model").exists()

        # resubmitted on one node (1 rank): picks up the newest checkpoint of the 2-rank job
        second = submit_slurm([*launch, "--nodes", "1", *overrides], env)[0]["train"]
        info = slurm.wait(second, timeout=900)
        text = (logs / f"lancer-{second}.out").read_text()
        assert info["JobState"] == "COMPLETED", f"{info}\n{text[-4000:]}"
        assert re.search(r"resuming a 2-rank checkpoint on 1 ranks", text), text[-4000:]
        resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]
        assert resumed and 2 <= resumed[0] < STEPS, text[-4000:]

    # the same config in one process, uninterrupted
    ref = tmp_path / "ref"
    check(
        run_group(
            [
                sys.executable,
                "-m",
                "lancer_dist.cli",
                "train",
                "--config",
                str(REPO / "configs" / "tiny.yaml"),
                *overrides,
                f"output_dir={ref}",
                f"train.checkpoint.dir={ref / 'checkpoints'}",
            ],
            900,
        )
    )
    a = load_file(str(run / "final_model" / "model.safetensors"))
    b = load_file(str(ref / "final_model" / "model.safetensors"))
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"SLURM 2 nodes -> 1 node vs one process: max |param diff| {diff:.1e}")
    assert diff <= 1e-10
