"""Checkpoint manager (manifest, verification, fall-back, crafted pickles, write failures), the output-directory
lock and the default locations of checkpoints and the MLflow store. One process; the trainer-level tests with real
DeepSpeed / Accelerate checkpoints are in tests/integration/test_train_reliability.py."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lancer_dist.train.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointManager,
    Part,
    UnsafeCheckpointError,
    check_pickles,
)
from lancer_dist.train.lock import LOCK_NAME, OutputDirLock, OutputDirLocked, _proc_start_time

REPO = Path(__file__).resolve().parents[2]


class _Evil:
    """Unpickling this runs ``touch <marker>`` (what a crafted checkpoint would do, with worse commands)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _manager(root: Path, state: dict, keep_last: int = 3, fail: Exception | None = None) -> CheckpointManager:
    def save_weights(d: Path) -> None:
        if fail is not None:
            (d / "partial.bin").write_bytes(b"x" * 1000)
            raise fail
        torch.save({"w": torch.arange(4.0) + state["step"]}, d / "weights.pt")

    def load_weights(d: Path) -> None:
        state["w"] = torch.load(d / "weights.pt", weights_only=False)["w"]  # as DeepSpeed does

    def save_state(d: Path) -> None:
        (d / "trainer_state.json").write_text(json.dumps({"step": state["step"]}))

    def load_state(d: Path) -> None:
        state["loaded_step"] = json.loads((d / "trainer_state.json").read_text())["step"]

    return CheckpointManager(
        root,
        {
            "weights": Part(save_weights, load_weights),
            "trainer": Part(save_state, load_state, per_rank=False),
        },
        rank=0,
        world_size=1,
        keep_last=keep_last,
    )


def _save(root: Path, steps: list[int]) -> CheckpointManager:
    state: dict = {}
    m = _manager(root, state)
    for s in steps:
        state["step"] = s
        m.save(s)
    return m


def test_save_writes_a_manifest_of_every_file_and_prunes(tmp_path: Path):
    m = _save(tmp_path, [1, 2, 3, 4])
    assert [p.name for p in m.candidates()] == ["step-00000002", "step-00000003", "step-00000004"]
    man = json.loads((tmp_path / "step-00000004" / MANIFEST).read_text())
    assert set(man["files"]) == {"weights.pt", "trainer_state.json"}
    import hashlib

    data = (tmp_path / "step-00000004" / "weights.pt").read_bytes()
    assert man["files"]["weights.pt"] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert not list(tmp_path.glob("*.tmp"))
    assert m.verify(tmp_path / "step-00000004") == []


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip"])
def test_auto_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path: Path, caplog, damage: str):
    m = _save(tmp_path, [2, 4])
    bad = tmp_path / "step-00000004" / "weights.pt"
    if damage == "truncate":
        bad.write_bytes(bad.read_bytes()[:100])
    elif damage == "delete":
        bad.unlink()
    else:  # same size, one byte changed
        b = bytearray(bad.read_bytes())
        b[-30] ^= 0xFF
        bad.write_bytes(bytes(b))
    with caplog.at_level(logging.WARNING, logger="lancer.train"):
        chosen = m.find("auto")
    assert chosen == tmp_path / "step-00000002"
    assert str(bad) in caplog.text and "skipping checkpoint" in caplog.text
    state: dict = {}
    _manager(tmp_path, state).load(chosen)
    assert state["loaded_step"] == 2 and torch.equal(state["w"], torch.arange(4.0) + 2)
    # an explicit resume from the damaged one is an error naming the file
    from lancer_dist.config import ConfigError

    with pytest.raises(ConfigError, match=r"weights\.pt"):
        m.find(str(tmp_path / "step-00000004"))


def test_no_complete_checkpoint_means_a_fresh_start(tmp_path: Path):
    m = _save(tmp_path, [2])
    (tmp_path / "step-00000002" / "trainer_state.json").unlink()
    assert m.find("auto") is None
    assert m.find("never") is None


def test_crafted_pickle_is_refused_and_never_runs(tmp_path: Path):
    """A checkpoint whose pickle would run a command: refused before any part is loaded, even with a manifest
    that matches (whoever can write the checkpoint can write the manifest too); the command never ran."""
    m = _save(tmp_path, [2])
    ck = tmp_path / "step-00000002"
    marker = tmp_path / "PWNED"
    torch.save({"w": torch.zeros(4), "x": _Evil(marker)}, ck / "weights.pt")
    man = json.loads((ck / MANIFEST).read_text())
    data = (ck / "weights.pt").read_bytes()
    import hashlib

    man["files"]["weights.pt"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ck / MANIFEST).write_text(json.dumps(man))
    problems = check_pickles(ck, ["weights.pt"])
    assert len(problems) == 1 and "weights.pt" in problems[0] and "system" in problems[0], problems
    with pytest.raises(UnsafeCheckpointError, match=r"weights\.pt"):
        m.find("auto")
    state: dict = {}
    with pytest.raises(UnsafeCheckpointError):
        _manager(tmp_path, state).load(ck)
    assert "w" not in state and "loaded_step" not in state
    assert not marker.exists()
    # the permissive loader really would have run it (the test's payload is live)
    torch.load(ck / "weights.pt", weights_only=False)
    assert marker.exists()


def test_a_checkpoint_without_manifest_still_has_its_pickles_checked(tmp_path: Path):
    m = _save(tmp_path, [2])
    ck = tmp_path / "step-00000002"
    (ck / MANIFEST).unlink()
    assert (
        m.find("auto") == ck
    )  # an older lancer's checkpoint: accepted (with a warning) when its pickles are safe
    torch.save({"x": _Evil(tmp_path / "PWNED")}, ck / "weights.pt")
    with pytest.raises(UnsafeCheckpointError):
        m.find("auto")
    assert not (tmp_path / "PWNED").exists()


def test_a_failed_write_names_the_checkpoint_and_removes_the_partial_one(tmp_path: Path):
    _save(tmp_path, [2])
    state: dict = {"step": 4}
    m = _manager(tmp_path, state, fail=OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(CheckpointError) as e:
        m.save(4)
    msg = str(e.value)
    assert str(tmp_path / "step-00000004") in msg and "No space left on device" in msg and "MiB free" in msg
    assert not (tmp_path / "step-00000004.tmp").exists() and not (tmp_path / "step-00000004").exists()
    assert [p.name for p in m.candidates()] == ["step-00000002"]


# ---- the output-directory lock -------------------------------------------------------------------------------


def _write_lock(out: Path, **holder) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / LOCK_NAME).write_text(json.dumps(holder))


def test_lock_refuses_a_live_holder_and_names_it(tmp_path: Path):
    OutputDirLock(tmp_path).acquire()
    with pytest.raises(OutputDirLocked) as e:
        OutputDirLock(tmp_path).acquire()  # the same live process holds it
    assert str(tmp_path) in str(e.value) and f"pid {os.getpid()}" in str(e.value)
    assert socket.gethostname() in str(e.value)


def test_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path: Path, caplog):
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    _write_lock(tmp_path, pid=p.pid, host=socket.gethostname(), started="then")
    with caplog.at_level(logging.WARNING):
        lock = OutputDirLock(tmp_path)
        lock.acquire()
    assert "stale lock" in caplog.text and str(p.pid) in caplog.text
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_with_a_recycled_pid_is_stale_but_a_live_one_elsewhere_is_not(tmp_path: Path, monkeypatch):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        real = _proc_start_time(sleeper.pid)
        _write_lock(tmp_path, pid=sleeper.pid, proc_start=real, host=socket.gethostname())
        with pytest.raises(OutputDirLocked, match=str(sleeper.pid)):
            OutputDirLock(tmp_path).acquire()
        # same pid, another start time: the pid was recycled, the holder is gone
        _write_lock(tmp_path, pid=sleeper.pid, proc_start="1", host=socket.gethostname())
        OutputDirLock(tmp_path).acquire()
        # a holder on another host cannot be checked: refused
        _write_lock(tmp_path, pid=1, host="some-other-host")
        with pytest.raises(OutputDirLocked, match="some-other-host"):
            OutputDirLock(tmp_path).acquire()
        # ... unless it is an earlier run of this very SLURM job (requeued: its processes are gone)
        _write_lock(tmp_path, pid=1, host="some-other-host", slurm_job_id="4242")
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        OutputDirLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


# ---- default locations ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_keep_checkpoints_and_mlflow_in_the_output_dir(config: Path, tmp_path: Path):
    """Two runs of one config with different output directories must not share checkpoints or a store."""
    from lancer_dist.config import load_config
    from lancer_dist.tracking import resolve_tracking_uri

    cfg = load_config(config, [f"output_dir={tmp_path / 'a'}"])
    assert cfg.train.checkpoint.dir == "", f"{config.name} sets train.checkpoint.dir to a fixed path"
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.output_dir)
    assert uri == f"sqlite:///{(tmp_path / 'a').resolve()}/mlflow.db"


def test_a_zombie_lock_holder_counts_as_dead() -> None:
    """A SIGKILLed rank whose torchrun died too stays a zombie until reaped: its pid exists (os.kill(pid, 0)
    succeeds) but it holds nothing; a live process does."""
    import subprocess
    import time

    from lancer_dist.train.lock import _pid_alive

    live = subprocess.Popen(["sleep", "30"])
    dead = subprocess.Popen(["true"])
    try:
        deadline = time.time() + 10
        while Path(f"/proc/{dead.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.time() < deadline
            time.sleep(0.05)
        os.kill(dead.pid, 0)  # the zombie's pid is still there
        assert not _pid_alive(dead.pid)
        assert _pid_alive(live.pid)
    finally:
        live.kill()
        live.wait()
        dead.wait()
