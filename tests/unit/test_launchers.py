"""Rendering and validation of ``lancer submit slurm|ray`` (no scheduler needed; the integration tests submit)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from launchers.ray_jobs import DEFAULT_EXCLUDES, RayJob, entrypoint, runtime_env
from launchers.slurm import (
    PREEMPTED_EXIT_CODE,
    SlurmJob,
    SubmitError,
    render_step_script,
    render_train_script,
)

REPO = Path(__file__).resolve().parents[2]
CFG = str(REPO / "configs" / "tiny.yaml")


def _bash_syntax_ok(script: str, tmp_path: Path) -> None:
    p = tmp_path / "job.sbatch"
    p.write_text(script)
    r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _sbatch_options(script: str) -> list[str]:
    return [line[len("#SBATCH ") :] for line in script.splitlines() if line.startswith("#SBATCH ")]


def test_cpu_multinode_script(tmp_path: Path):
    job = SlurmJob(
        config=CFG, nodes=2, overrides=["train.lr=1e-4"], time="01:00:00", partition="cpu", workdir=str(REPO)
    )
    script = render_train_script(job, "tiny")
    _bash_syntax_ok(script, tmp_path)
    opts = _sbatch_options(script)
    for o in ["--nodes=2", "--ntasks-per-node=1", "--time=01:00:00", "--partition=cpu", "--requeue"]:
        assert o in opts
    assert "--signal=B:USR1@300" in opts
    assert not any(o.startswith("--gpus") for o in opts)
    assert "export CUDA_VISIBLE_DEVICES=" in script  # -> gloo in lancer_dist.dist
    assert "--nnodes=2 --nproc_per_node=1" in script and "--rdzv_backend=c10d" in script
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script and "NodeAddr=" in script
    assert f'"$rc" -eq {PREEMPTED_EXIT_CODE}' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert "trap on_preempt USR1" in script
    assert f"lancer_dist.cli train --config {CFG} train.lr=1e-4" in script
    assert '"tracking.run_name=tiny-$SLURM_JOB_ID"' in script  # same name after a requeue (same job id)


@pytest.mark.parametrize(
    ("nodes", "overrides", "field"),
    [
        (3, [], "data.retrieval.queries_per_step"),  # tiny: 4 queries per step over 3 ranks
        (
            2,
            ["data.erasure.passages_per_language=1", "data.erasure.languages=[en,fr,de]"],
            "passages_per_language",
        ),
    ],
)
def test_a_global_batch_that_does_not_split_over_the_ranks_is_refused_before_sbatch(
    nodes: int, overrides: list[str], field: str
) -> None:
    from lancer_dist.config import ConfigError

    job = SlurmJob(config=CFG, nodes=nodes, overrides=overrides, workdir=str(REPO))
    with pytest.raises(ConfigError, match=re.escape(field)):
        render_train_script(job)
    render_train_script(SlurmJob(config=CFG, nodes=2, workdir=str(REPO)))  # 4 queries, 2 x 4 passages: fine


def test_gpu_script_uses_nccl_env_and_one_rank_per_gpu(tmp_path: Path):
    # 32 ranks: the global batch must split into 32 equal slices (see the next test)
    big = ["data.retrieval.queries_per_step=64", "data.erasure.passages_per_language=8"]
    job = SlurmJob(config=CFG, nodes=4, gpus_per_node=8, cpus_per_task=64, workdir=str(REPO), overrides=big)
    script = render_train_script(job)
    _bash_syntax_ok(script, tmp_path)
    opts = _sbatch_options(script)
    assert "--gpus-per-node=8" in opts and "--cpus-per-task=64" in opts
    assert "--nnodes=4 --nproc_per_node=8" in script
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in script
    assert "CUDA_VISIBLE_DEVICES=" not in script


def test_no_requeue(tmp_path: Path):
    script = render_train_script(SlurmJob(config=CFG, requeue=False, workdir=str(REPO)))
    _bash_syntax_ok(script, tmp_path)
    assert "--no-requeue" in _sbatch_options(script)
    assert "trap on_preempt" not in script and "scontrol requeue" not in script


def test_rendezvous_port_is_per_job_and_in_range():
    """Evaluate the script's own port line with bash for consecutive and far-apart job ids."""
    line = next(
        ln for ln in render_train_script(SlurmJob(config=CFG)).splitlines() if ln.startswith("RDZV_PORT=")
    )
    ports = []
    for jid in [1, 2, 3, 14999, 15000, 123456]:
        r = subprocess.run(
            ["bash", "-c", f'{line}; echo "$RDZV_PORT"'],
            env={"SLURM_JOB_ID": str(jid), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
        )
        ports.append(int(r.stdout))
    assert all(15000 <= p < 30000 for p in ports)
    assert len(set(ports[:4])) == 4  # neighbouring jobs differ
    r = subprocess.run(
        ["bash", "-c", f'{line}; echo "$RDZV_PORT"'],
        env={"SLURM_JOB_ID": "7", "LANCER_RDZV_PORT": "23456"},
        capture_output=True,
        text=True,
    )
    assert r.stdout.strip() == "23456"


def test_chained_step_script(tmp_path: Path):
    job = SlurmJob(config=CFG, nodes=2, then=["eval"], overrides=["eval.top_k=10"], workdir=str(REPO))
    script = render_step_script(job, "eval")
    _bash_syntax_ok(script, tmp_path)
    assert "--nodes=1" in _sbatch_options(script)
    assert f"lancer_dist.cli eval --config {CFG} eval.top_k=10" in script
    # The step evaluates the model the training step writes (as the LANCER model, next to the baseline).
    final = REPO / yaml.safe_load(Path(CFG).read_text())["output_dir"] / "final_model"
    assert f"eval.top_k=10 eval.lancer_model={final}" in script
    assert f"eval.model={final}" in render_step_script(job, "encode")
    job.overrides.append("eval.lancer_model=/elsewhere")
    assert str(final) not in render_step_script(job, "eval")


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"nodes": 0}, "--nodes"),
        ({"gpus_per_node": -1}, "--gpus-per-node"),
        ({"gpus_per_node": 4, "procs_per_node": 2}, "--procs-per-node"),
        ({"time": "1 hour"}, "--time"),
        ({"then": ["search"]}, "--then"),
        ({"job_name": "a b"}, "--job-name"),
        ({"signal_seconds": 1}, "--signal-seconds"),
        ({"env": {"1BAD": "x"}}, "--env"),
    ],
)
def test_invalid_submission_names_the_argument(kwargs: dict, arg: str):
    with pytest.raises(SubmitError) as e:
        render_train_script(SlurmJob(config=CFG, **kwargs))
    assert e.value.arg == arg and str(e.value).startswith(arg)


def _lancer(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "launchers.cli", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_dry_run_prints_scripts_and_submits_nothing(tmp_path: Path):
    r = _lancer(
        "submit", "slurm", "--config", "configs/tiny.yaml", "--nodes", "2", "--then", "encode,eval",
        "--log-dir", str(tmp_path / "logs"), "--dry-run", "train.steps=3",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("#!/bin/bash") == 3
    assert (
        "afterok" in r.stdout and "lancer_dist.cli encode" in r.stdout and "lancer_dist.cli eval" in r.stdout
    )
    assert not (tmp_path / "logs").exists()


def test_cli_rejects_a_bad_config_before_submitting():
    r = _lancer("submit", "slurm", "--config", "configs/tiny.yaml", "--dry-run", "train.steps=0")
    assert r.returncode == 2 and "train.steps" in r.stderr
    r = _lancer("submit", "slurm", "--config", "configs/tiny.yaml", "--nodes", "0", "--dry-run")
    assert r.returncode == 2 and "--nodes" in r.stderr


def test_ray_entrypoint_and_runtime_env(tmp_path: Path):
    job = RayJob(config=CFG, workers=2, cpus_per_worker=1, overrides=["train.steps=3"], working_dir=str(REPO))
    ep = entrypoint(job)
    # Training is a Ray Train driver; no torchrun inside the job.
    assert ep.startswith("python -m launchers.ray_train --config configs/tiny.yaml train.steps=3")
    assert "torch.distributed.run" not in ep
    # The flags become train.ray overrides, after the user's (flags win).
    assert "train.ray.num_workers=2 train.ray.cpus_per_worker=1" in ep
    cfg = yaml.safe_load(Path(CFG).read_text())
    # Relative outputs are pinned to the submitting directory (Ray's copy of the working dir is temporary).
    assert f"output_dir={REPO / cfg['output_dir']}" in ep
    # the config leaves train.checkpoint.dir empty: checkpoints follow output_dir, nothing to pin
    assert "dir" not in cfg["train"]["checkpoint"] and "train.checkpoint.dir" not in ep
    env = runtime_env(job)
    assert env["working_dir"] == str(REPO) and set(DEFAULT_EXCLUDES) <= set(env["excludes"])
    assert {".venv", ".cache", "runs"} <= set(env["excludes"])
    # Ray's own matcher over the excludes: every tracked source file of the packages travels with the job
    from ray._private.thirdparty.pathspec import PathSpec

    spec = PathSpec.from_lines("gitwildmatch", env["excludes"])
    tracked = subprocess.run(
        ["git", "ls-files", "lancer_dist", "launchers", "configs"], cwd=REPO, capture_output=True, text=True
    ).stdout.split()
    assert any(p.startswith("lancer_dist/data/") for p in tracked)
    assert [p for p in tracked if spec.match_file(p)] == []
    assert spec.match_file("data/bible/x.json") and spec.match_file(".venv/bin/python")
    assert Path(env["env_vars"]["LANCER_CACHE"]).is_absolute()
    assert env["env_vars"]["CUDA_VISIBLE_DEVICES"] == ""
    assert env["env_vars"]["RAY_DEDUP_LOGS"] == "0"  # every rank's lines reach the job log
    # GPU workers: the GPUs stay visible (Ray assigns each worker its own).
    gpu = RayJob(config=CFG, gpus_per_worker=1, working_dir=str(REPO))
    assert "CUDA_VISIBLE_DEVICES" not in runtime_env(gpu)["env_vars"]
    assert "train.ray.gpus_per_worker=1" in entrypoint(gpu)

    ev = entrypoint(RayJob(config=CFG, verb="eval", workers=3, working_dir=str(REPO)))
    assert ev.startswith("python -m lancer_dist.cli eval --config configs/tiny.yaml")
    assert "torch.distributed.run" not in ev and "train.ray" not in ev


def test_ray_train_driver_builds_the_trainer_from_the_config(tmp_path: Path):
    pytest.importorskip("ray.train")
    from launchers.ray_train import build_trainer, main

    out = tmp_path / "run"
    trainer = build_trainer(
        CFG,
        [
            f"output_dir={out}",
            f"train.checkpoint.dir={out / 'ckpt'}",
            "train.ray.num_workers=3",
            "train.ray.cpus_per_worker=2",
            "train.ray.gpus_per_worker=0.5",
            "train.ray.placement=STRICT_SPREAD",
            "train.ray.max_failures=4",
        ],
    )
    sc, rc = trainer.scaling_config, trainer.run_config
    assert sc.num_workers == 3 and sc.use_gpu and sc.placement_strategy == "STRICT_SPREAD"
    assert sc.resources_per_worker == {"CPU": 2.0, "GPU": 0.5}
    assert rc.failure_config.max_failures == 4
    assert rc.storage_path == str(out / "ray_train") and rc.name == "tiny"
    # Workers on other nodes must find the checkpoints: relative output paths are refused before Ray starts.
    assert main(["--config", CFG, "output_dir=runs/x"]) == 2


def test_ray_job_validation(tmp_path: Path):
    with pytest.raises(SubmitError, match="verb"):
        RayJob(config=CFG, verb="search").validate()
    with pytest.raises(SubmitError, match="--workers"):
        RayJob(config=CFG, workers=0).validate()
    with pytest.raises(SubmitError, match="--cpus-per-worker"):
        RayJob(config=CFG, cpus_per_worker=0).validate()
    with pytest.raises(SubmitError, match="--working-dir"):
        RayJob(config=CFG, working_dir=str(tmp_path / "missing")).validate()


def test_cli_help_lists_submit():
    r = _lancer("submit", "--help")
    assert r.returncode == 0 and re.search(r"slurm", r.stdout) and re.search(r"ray", r.stdout)


def test_the_library_never_imports_the_launchers():
    """The dependency goes one way: launchers -> lancer_dist. The ``lancer`` program with ``submit`` is composed by
    ``launchers.cli.main`` (the installed entry point); ``python -m lancer_dist.cli`` has the library's verbs only."""
    import ast

    for f in (REPO / "lancer_dist").rglob("*.py"):
        tree = ast.parse(f.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        strings = [
            n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
        ]
        assert not any(n.split(".")[0] == "launchers" for n in names), f  # no import
        assert not any(s.split(".")[0] == "launchers" for s in strings), f  # no importlib by name
    import tomllib

    entry = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["lancer"]
    assert entry == "launchers.cli:main"
    library = subprocess.run(
        [sys.executable, "-m", "lancer_dist.cli", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert library.returncode == 0 and "train" in library.stdout and "submit" not in library.stdout
    full = _lancer("--help")
    assert full.returncode == 0 and "train" in full.stdout and "submit" in full.stdout


def test_sbatch_template_and_rendered_script_fail_fast_on_nccl():
    template = (REPO / "cluster" / "slurm" / "train_multinode.sbatch").read_text()
    # 16 ranks: the global batch must split into 16 equal slices
    big = ["data.retrieval.queries_per_step=16", "data.erasure.passages_per_language=8"]
    rendered = render_train_script(
        SlurmJob(config=CFG, nodes=2, gpus_per_node=8, workdir=str(REPO), overrides=big)
    )
    for script in (template, rendered):
        assert "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in script
        assert "export NCCL_DEBUG=${NCCL_DEBUG:-WARN}" in script
