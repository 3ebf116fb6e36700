"""Helpers to run the real trainer in tests: a small config on the offline backbone + Bible data, and torchrun."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lancer_dist.dist import find_free_port

REPO = Path(__file__).resolve().parents[2]


def write_config(tmp: Path, bible: Path, model_dir: Path, **sections: Any) -> Path:
    """A small run config: the shrunk multilingual-e5-small (2 layers) on the test Bible data."""
    cfg: dict[str, Any] = {
        "name": "test",
        "output_dir": str(tmp / "run"),
        "model": {
            "name_or_path": str(model_dir),
            "pooling": "mean",
            "normalize": True,
            "temperature": 0.05,
            "query_prefix": "query: ",
            "passage_prefix": "passage: ",
            "max_query_length": 32,
            "max_passage_length": 32,
            "dropout": 0.0,
        },
        "loss": {"erasure_weight": 1.0},
        "data": {
            "retrieval": {"path": str(bible / "retrieval"), "group_size": 2, "queries_per_step": 4},
            "erasure": {
                "path": str(bible / "erasure"),
                "languages": ["en", "fr", "zh", "ar"],
                "passages_per_language": 2,
            },
            "num_workers": 0,
            "shuffle_buffer": 8,
        },
        "train": {
            "steps": 4,
            "lr": 1e-4,
            "warmup_steps": 0,
            "log_every": 1,
            "seed": 7,
            "checkpoint": {"dir": str(tmp / "run" / "checkpoints"), "every": 0, "keep_last": 2},
        },
        "probe": {
            "enabled": False,
            "every": 2,
            "path": str(bible / "probe"),
            "train_per_language": 8,
            "test_per_language": 4,
        },
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "test"},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(cfg.get(section), dict):
            _merge(cfg[section], values)
        else:
            cfg[section] = values
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def train_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def torchrun_cmd(nproc: int, *args: str, module: str = "lancer_dist.cli") -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--nnodes",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(find_free_port()),
        "-m",
        module,
        *args,
    ]


def run_train(
    config: Path, *overrides: str, nproc: int = 1, timeout: float = 600
) -> subprocess.CompletedProcess:
    if nproc == 1:
        cmd = [sys.executable, "-m", "lancer_dist.cli", "train", "--config", str(config), *overrides]
    else:
        cmd = torchrun_cmd(nproc, "train", "--config", str(config), *overrides)
    return run_group(cmd, timeout)


def start_group(cmd: list[str]) -> subprocess.Popen:
    """Start a command (e.g. torchrun) in its own process group, so a test can signal or kill all of it."""
    return subprocess.Popen(
        cmd,
        env=train_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def kill_group(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGKILL a run started by :func:`start_group` with every process under it (no chance to clean up), and wait
    until none is left. torchrun starts each rank in its own session, so killing torchrun's process group alone
    leaves the ranks running: they would go on training and keep the output directory's lock."""
    from tests.servers import _alive, _descendants

    pids = _descendants(proc.pid)  # before torchrun dies: its orphans are re-parented and lost from the tree
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        assert time.monotonic() < deadline, f"processes {[p for p in pids if _alive(p)]} alive after SIGKILL"
        time.sleep(0.05)


def run_group(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout the whole group (torchrun and its ranks) is killed."""
    proc = start_group(cmd)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {cmd}\n--- stderr\n{err[-6000:]}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def check(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, (
        f"exit {proc.returncode} != {code}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"
    )


def submit_slurm(args: list[str], env: dict[str, str]) -> tuple[dict[str, int], str]:
    """``lancer submit slurm ARGS``: the job ids it printed (``{"train": id, "eval": id, ...}``) and its stdout."""
    r = subprocess.run(
        [sys.executable, "-m", "launchers.cli", "submit", "slurm", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    ids = {m.group(1): int(m.group(2)) for m in re.finditer(r"submitted (\w+): job (\d+)", r.stdout)}
    assert "train" in ids, r.stdout
    return ids, r.stdout


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The committed checkpoints in ``ckpt_dir``, oldest first: renamed from ``step-N.tmp`` with their manifest (a
    ``.tmp`` directory already holds ``trainer_state.json`` while the save is still running)."""
    from lancer_dist.train.checkpoint import CKPT_PREFIX, MANIFEST

    return sorted(
        p
        for p in ckpt_dir.glob(f"{CKPT_PREFIX}*")
        if not p.name.endswith(".tmp") and (p / MANIFEST).is_file()
    )


def one_trainer_step(
    out: Path, cfg: Path, nproc: int, steps: int = 1, save_final: bool = False, torchrun: bool = False
) -> tuple[dict, dict]:
    """One ``Trainer.train_step`` on the config's first global batch (``steps``: on each of the first global
    batches; tests/distributed/trainer_step_program.py: each of ``nproc`` ranks gets its ``TrainBatch.shard``): the
    last step's metrics and the parameters after it. ``save_final``: also the trainer's final model. ``torchrun``:
    start one process under torchrun too (DeepSpeed needs it)."""
    import json

    from safetensors.torch import load_file

    prog = "tests.distributed.trainer_step_program"
    cmd = [sys.executable, "-m", prog] if nproc == 1 and not torchrun else torchrun_cmd(nproc, module=prog)
    extra = ["--save-final"] if save_final else []
    check(run_group([*cmd, str(cfg), str(out), str(steps), *extra], 600))
    return json.loads((out / "metrics.json").read_text()), load_file(str(out / "params.safetensors"))
