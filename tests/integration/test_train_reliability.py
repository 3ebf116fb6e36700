"""What a hostile or unlucky day does to `lancer train` (issue #14, training side), with the real trainer, real
DeepSpeed / Accelerate checkpoints, a real MLflow sqlite store and a real full filesystem:

* two jobs on one output directory: the second is refused on every rank; a crashed job's lock is taken over;
* a crafted DeepSpeed checkpoint (a pickle that runs a command) is refused and the command never runs;
* a checkpoint copied from another run does not continue that run's MLflow run;
* a truncated or missing file in the newest checkpoint: `resume: auto` falls back to the previous one;
* a disk that fills up during a save: one clear error naming the checkpoint, no traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration.trainrun import check, run_train, start_group, write_config

pytestmark = pytest.mark.slow


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _wait(pred, timeout: float, proc: subprocess.Popen, what: str) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}):\n{proc.communicate()[1][-4000:]}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_second_run_on_an_output_dir_is_refused_and_a_crashed_runs_lock_taken_over(
    tmp_path, bible_data, e5_small_model_dir
):
    cfg = write_config(tmp_path, bible_data, e5_small_model_dir, train={"steps": 400})
    run = tmp_path / "run"
    first = start_group([sys.executable, "-m", "lancer_dist.cli", "train", "--config", str(cfg)])
    try:
        _wait(
            lambda: (run / "mlflow_spool").is_dir() and (run / "config.yaml").is_file(), 300, first, "run 1"
        )
        before = sorted(os.listdir(run))
        # a 2-rank job on the same directory: every rank is told, nothing is written, nobody hangs
        second = run_train(cfg, "train.steps=2", nproc=2, timeout=300)
        assert second.returncode != 0, second.stderr[-3000:]
        refusal = f"output directory {run} is in use by another training job: pid {first.pid}"
        assert second.stderr.count(refusal) == 2, second.stderr[-3000:]  # both ranks
        # each rank exited 3 with the message, no traceback of ours (torchrun still prints its own report)
        assert "exitcode  : 3" in second.stderr and "lancer_dist/train" not in second.stderr
        assert first.poll() is None  # the first run goes on
        assert sorted(os.listdir(run)) == before
        os.killpg(first.pid, signal.SIGKILL)  # crash: the lock stays behind
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert json.loads((run / ".lancer.lock").read_text())["pid"] == first.pid
    third = run_train(cfg, "train.steps=2")
    check(third)
    assert (
        "taking over the stale lock" in third.stderr
        and f"process {first.pid} on this host is gone" in third.stderr
    )
    assert not (run / ".lancer.lock").exists()  # released at the end


def _rewrite_manifest_entry(ckpt: Path, name: str) -> None:
    """What an attacker who can write the checkpoint does: make the manifest match the crafted file."""
    man_path = ckpt / "manifest.json"
    if not man_path.is_file():
        return
    man = json.loads(man_path.read_text())
    data = (ckpt / name).read_bytes()
    man["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    man_path.write_text(json.dumps(man))


def test_crafted_deepspeed_checkpoint_is_refused_and_runs_nothing(tmp_path, bible_data, e5_small_model_dir):
    cfg = write_config(
        tmp_path, bible_data, e5_small_model_dir, train={"strategy": "deepspeed", "zero_stage": 2, "steps": 2}
    )
    check(run_train(cfg, nproc=2))
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    target = "pytorch_model/mp_rank_00_model_states.pt"
    assert (ckpt / target).is_file()
    marker = tmp_path / "PWNED"
    real = torch.load(ckpt / target, map_location="cpu", weights_only=False)
    real["extra"] = _Evil(
        marker
    )  # the real state plus a payload: DeepSpeed would load it and run the command
    torch.save(real, ckpt / target)
    _rewrite_manifest_entry(ckpt, target)
    shutil.rmtree(tmp_path / "run" / "final_model")
    resumed = run_train(cfg, "train.steps=4", nproc=2)
    assert not marker.exists(), "the crafted pickle was executed"
    assert resumed.returncode != 0
    assert "refusing to load a checkpoint" in resumed.stderr and target.split("/")[1] in resumed.stderr
    assert "system" in resumed.stderr  # names the refused global (posix.system)
    assert not (tmp_path / "run" / "final_model").exists()


def test_copied_checkpoint_starts_a_new_mlflow_run(tmp_path, bible_data, e5_small_model_dir):
    from mlflow.tracking import MlflowClient

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg_a = write_config(
        a, bible_data, e5_small_model_dir, train={"steps": 2}, tracking={"tracking_uri": store}
    )
    check(run_train(cfg_a))
    shutil.copytree(a / "run" / "checkpoints", b / "run" / "checkpoints")
    cfg_b = write_config(
        b, bible_data, e5_small_model_dir, train={"steps": 4}, tracking={"tracking_uri": store}
    )
    second = run_train(cfg_b)
    check(second)
    assert "at step 2" in second.stderr and "was written by another run" in second.stderr
    client = MlflowClient(tracking_uri=store)
    exp = client.get_experiment_by_name("test")
    runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    assert len(runs) == 2
    steps = {rid: sorted(m.step for m in client.get_metric_history(rid, "loss/total")) for rid in runs}
    assert sorted(steps.values()) == [[1, 2], [3, 4]], steps  # the original run was not continued
    assert all(r.info.status == "FINISHED" for r in runs.values())
    # the directory's own checkpoint still continues its own run
    third = run_train(cfg_b, "train.steps=5")
    check(third)
    assert "was written by another run" not in third.stderr
    runs_after = client.search_runs([exp.experiment_id])
    assert len(runs_after) == 2


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, bible_data, e5_small_model_dir):
    cfg = write_config(
        tmp_path,
        bible_data,
        e5_small_model_dir,
        train={"steps": 4, "checkpoint": {"every": 2, "keep_last": 2}},
    )
    check(run_train(cfg))
    ckdir = tmp_path / "run" / "checkpoints"
    bad = ckdir / "step-00000004" / "model.safetensors"
    bad.write_bytes(
        bad.read_bytes()[: bad.stat().st_size // 2]
    )  # truncated (a crash or a full disk mid-copy)
    resumed = run_train(cfg, "train.steps=6")
    check(resumed)
    assert f"skipping checkpoint {ckdir / 'step-00000004'}" in resumed.stderr and str(bad) in resumed.stderr
    assert f"resumed from {ckdir / 'step-00000002'} at step 2" in resumed.stderr
    assert "Traceback" not in resumed.stderr
    gone = ckdir / "step-00000006" / "optimizer.bin"
    gone.unlink()  # a missing file
    again = run_train(cfg, "train.steps=8")
    check(again)
    assert f"{gone}: missing" in again.stderr
    assert f"resumed from {ckdir / 'step-00000004'} at step 4" in again.stderr
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["step"] for h in history] == [5, 6, 7, 8]


@pytest.fixture
def small_fs(tmp_path: Path):
    """A real 80 MiB filesystem (tmpfs): room for the model (47 MB) but not for model + optimizer states."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_during_a_save_is_one_clear_error(tmp_path, small_fs, bible_data, e5_small_model_dir):
    out = small_fs / "run"
    # the default MLflow store (<output_dir>/mlflow.db) shares the full filesystem, as in the report
    cfg = write_config(
        tmp_path, bible_data, e5_small_model_dir, output_dir=str(out), tracking={"tracking_uri": ""}
    )
    y = (
        (tmp_path / "config.yaml")
        .read_text()
        .replace(str(tmp_path / "run" / "checkpoints"), str(out / "checkpoints"))
    )
    (tmp_path / "config.yaml").write_text(y)
    proc = run_train(cfg, "train.steps=2")
    assert proc.returncode == 1, proc.stderr[-4000:]
    err = proc.stderr
    assert f"lancer: error: cannot write checkpoint {out / 'checkpoints' / 'step-00000002'}" in err, err[
        -4000:
    ]
    assert "the disk is full" in err
    assert "Traceback" not in err, err[-6000:]
    assert err.lower().count("sqlite") <= 2, err[-6000:]
    assert not list((out / "checkpoints").glob("*.tmp"))  # the partial checkpoint was removed
    # the run is recorded as FAILED in the store on that filesystem
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert run.info.status == "FAILED"
