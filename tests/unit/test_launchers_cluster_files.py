"""The templates in cluster/ are valid for the tools that read them (each tool's own validator, strict on typos)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from launchers.slurm import SlurmJob, render_train_script

REPO_LAUNCHERS = Path(__file__).resolve().parents[2] / "launchers"
CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


@pytest.mark.parametrize("path", sorted((CLUSTER / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_configs(path: Path):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    ds = json.loads(path.read_text())
    zero = DeepSpeedZeroConfig(**ds["zero_optimization"])  # pydantic, extra="forbid": a misspelt key fails
    assert f"zero{zero.stage}" in path.name
    offload = "offload" in path.name
    assert (zero.offload_optimizer is not None) == offload
    if offload:
        # A client torch optimizer with ZeRO-Offload needs this, else DeepSpeed refuses to start.
        assert ds["zero_force_ds_cpu_optimizer"] is False
    # Batch sizes, precision and the optimizer come from the run config (lancer_dist.train.trainer fills them in).
    assert not {"train_batch_size", "optimizer", "bf16", "fp16"} & set(ds)


def test_deepspeed_stage_set_complete():
    names = {p.stem for p in (CLUSTER / "deepspeed").glob("*.json")}
    assert {"zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"} <= names


def test_deepspeed_config_rejects_typo():
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    with pytest.raises(ValueError):
        DeepSpeedZeroConfig(stage=2, overlap_com=True)


@pytest.mark.parametrize("path", sorted((CLUSTER / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_configs(path: Path):
    from accelerate.commands.config.config_args import ClusterConfig

    cfg = ClusterConfig.from_yaml_file(str(path))  # raises on unknown keys
    assert cfg.num_processes >= 1
    ds = (cfg.deepspeed_config or {}).get("deepspeed_config_file")
    if ds:
        assert (CLUSTER.parent / ds).is_file()


def test_ray_cluster_yaml():
    from ray.autoscaler._private.util import validate_config

    cfg = yaml.safe_load((CLUSTER / "ray" / "cluster.yaml").read_text())
    validate_config(cfg)  # Ray's own JSON schema
    head = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head  # the Jobs API is not exposed on a public address
    bad = dict(cfg, available_node_types={**cfg["available_node_types"], "head": {"typo": 1}})
    with pytest.raises(Exception):  # noqa: B017 (jsonschema's ValidationError)
        validate_config(bad)


@pytest.mark.parametrize("path", sorted((CLUSTER / "slurm").glob("*.sbatch")), ids=lambda p: p.name)
def test_slurm_templates_parse(path: Path):
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_cluster_scripts_are_the_templates_rendered():
    """cluster/slurm/*.sbatch are generated from launchers/templates/ (the one source that `lancer submit slurm`
    renders): the committed files are exactly what the templates give (regenerate with
    `python -m launchers.slurm --write-cluster-scripts`), and the launcher's own script shares their job logic."""
    from launchers.slurm import CLUSTER_RENDERERS, PREEMPTED_EXIT_CODE

    assert set(CLUSTER_RENDERERS) == {p.name for p in (CLUSTER / "slurm").glob("*.sbatch")}
    for name, render in CLUSTER_RENDERERS.items():
        assert (CLUSTER / "slurm" / name).read_text() == render(), f"{name}: regenerate it from the template"
    by_hand = (CLUSTER / "slurm" / "train_multinode.sbatch").read_text()
    rendered = render_train_script(SlurmJob(config=str(CLUSTER.parent / "configs" / "tiny.yaml"), nodes=2))
    for marker in (
        "HEAD_ADDR=$(scontrol",
        "RDZV_PORT=",
        "trap on_preempt USR1",
        'scontrol requeue "$SLURM_JOB_ID"',
    ):
        assert marker in by_hand and marker in rendered, marker
    assert (
        f'"$rc" -eq {PREEMPTED_EXIT_CODE} ]' in by_hand and f'"$rc" -eq {PREEMPTED_EXIT_CODE} ]' in rendered
    )
    # the exit code has one definition: the scripts get it from lancer_dist.train, neither template spells it
    for template in (REPO_LAUNCHERS / "templates").glob("*.j2"):
        assert str(PREEMPTED_EXIT_CODE) not in template.read_text(), template
