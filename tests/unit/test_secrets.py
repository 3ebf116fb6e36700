"""Secrets never reach logs, sbatch scripts, Ray job metadata or MLflow params (lancer_dist.redact + launchers)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lancer_dist.config import RunConfig, config_to_dict, flatten
from lancer_dist.redact import REDACTED, is_secret_name, redact, redact_mapping, redact_uri, secret_values
from launchers.ray_jobs import RayJob, runtime_env
from launchers.slurm import SlurmJob, SubmitError, render_train_script

REPO = Path(__file__).resolve().parents[2]
ENV = {
    "MLFLOW_TRACKING_TOKEN": "tok-abcdef123",
    "MLFLOW_TRACKING_PASSWORD": "pw-98765",
    "AWS_SECRET_ACCESS_KEY": "aws/SECRET+key",
    "HF_TOKEN": "hf_xyzxyz",
    "HOME": "/root",
    "TOKENIZERS_PARALLELISM": "false",
    "MLFLOW_TRACKING_USERNAME": "alice",
}


@pytest.mark.parametrize(
    "name",
    [
        "MLFLOW_TRACKING_TOKEN",
        "DB_PASSWORD",
        "AWS_SECRET_ACCESS_KEY",
        "HF_TOKEN",
        "api_key",
        "apiKey",
        "client-secret",
        "GITHUB_TOKEN",
        "password",
        "--password",
        "WANDB_API_KEY",
        "Authorization",
        "SSH_PASS",
        "accessToken",
    ],
)
def test_secret_names(name: str):
    assert is_secret_name(name)


@pytest.mark.parametrize(
    "name",
    [
        "TOKENIZERS_PARALLELISM",
        "max_tokens",
        "model.tokenizer",
        "passages_per_language",
        "PWD",
        "RAY_AUTH_MODE",
        "MLFLOW_TRACKING_USERNAME",
        "HOME",
        "tracking_uri",
        "author",
        "compass",
        "bypass_cache",
    ],
)
def test_not_secret_names(name: str):
    assert not is_secret_name(name)


def test_secret_values_come_from_secret_names_only():
    assert set(secret_values(ENV)) == {"tok-abcdef123", "pw-98765", "aws/SECRET+key", "hf_xyzxyz"}


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://bob:s3cr3t@mlflow.example:5000/api", f"http://bob:{REDACTED}@mlflow.example:5000/api"),
        ("postgresql://u:p%40ss@db/mlflow", f"postgresql://u:{REDACTED}@db/mlflow"),
        ("https://ghp_TOKEN123@github.com/x.git", f"https://{REDACTED}@github.com/x.git"),
        ("http://h:5000/x?token=abc&run=1", f"http://h:5000/x?token={REDACTED}&run=1"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("s3://bucket/path@v2", "s3://bucket/path@v2"),  # '@' after the path is not user-info
    ],
)
def test_redact_uri(uri: str, expected: str):
    assert redact_uri(uri) == expected


@pytest.mark.parametrize(
    ("text", "gone", "kept"),
    [
        ("export MLFLOW_TRACKING_TOKEN=tok-abcdef123", ["tok-abcdef123"], ["MLFLOW_TRACKING_TOKEN="]),
        ("connecting with pw-98765 now", ["pw-98765"], ["connecting with", "now"]),
        ('{"password": "hunter2", "lr": 0.1}', ["hunter2"], ['"lr": 0.1']),
        ("db_password: hunter3\nsteps: 4", ["hunter3"], ["steps: 4"]),
        ("Authorization: Bearer eyJhbGciOi.x.y", ["eyJhbGciOi.x.y"], ["Authorization: Bearer"]),
        ("mlflow server --password hunter4 --port 5000", ["hunter4"], ["--port 5000"]),
        ("uri=http://alice:pw@h:1 max_tokens=512", ["alice:pw@"], ["max_tokens=512", "alice"]),
        ("tokenizer=/models/e5 TOKENIZERS_PARALLELISM=false", [], ["tokenizer=/models/e5", "=false"]),
        ("key aws/SECRET+key in a traceback", ["aws/SECRET+key"], ["in a traceback"]),
    ],
)
def test_redact_text(text: str, gone: list[str], kept: list[str]):
    out = redact(text, env=ENV)
    for g in gone:
        assert g not in out, out
    for k in kept:
        assert k in out, out
    assert redact(out, env=ENV) == out  # idempotent


def test_redact_mapping_for_mlflow_params():
    """What the tracking module logs as params: the flattened config, with credentials blanked, nothing else
    changed."""
    cfg = RunConfig()
    cfg.tracking.tracking_uri = "https://alice:pw-98765@mlflow.example"
    d = config_to_dict(cfg)
    d["extra"] = {"api_token": "abc123", "nested": [{"password": "p1"}, "http://x:y@h"], "n": 3, "none": None}
    out = flatten(redact_mapping(d, env=ENV))
    flat_in = flatten(d)
    assert out["tracking.tracking_uri"] == f"https://alice:{REDACTED}@mlflow.example"
    assert out["extra.api_token"] == REDACTED
    assert out["extra.nested"] == [{"password": REDACTED}, f"http://x:{REDACTED}@h"]
    assert out["extra.n"] == 3 and out["extra.none"] is None
    changed = {k for k in flat_in if flat_in[k] != out[k]}
    assert changed == {"tracking.tracking_uri", "extra.api_token", "extra.nested"}
    assert not any("pw-98765" in str(v) or "abc123" in str(v) for v in out.values())


def test_sbatch_script_holds_no_secret_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    job = SlurmJob(
        config=str(REPO / "configs/tiny.yaml"), nodes=2, overrides=["train.lr=1e-4"], env={"FOO": "1"}
    )
    script = render_train_script(job, "tiny")
    for secret in secret_values(ENV):
        assert secret not in script
    assert "MLFLOW_TRACKING_TOKEN" not in script  # credentials travel in sbatch's exported environment only


@pytest.mark.parametrize(
    "field",
    [
        {"overrides": ["tracking.tracking_uri=http://u:pw@h:5000"]},
        {"env": {"MLFLOW_TRACKING_TOKEN": "abc"}},
        {"sbatch_args": ["--comment=password=abc"]},
    ],
)
def test_sbatch_refuses_credentials(field: dict):
    job = SlurmJob(config=str(REPO / "configs/tiny.yaml"), **field)
    with pytest.raises(SubmitError, match="no credentials") as e:
        render_train_script(job)
    assert "pw@" not in str(e.value) and "'abc'" not in str(e.value)


def test_ray_job_refuses_credentials_and_keeps_env_clean(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-abcdef123")
    with pytest.raises(SubmitError, match="no credentials"):
        RayJob(config=str(REPO / "configs/tiny.yaml"), env={"HF_TOKEN": "x1234"}).validate()
    env = runtime_env(RayJob(config=str(REPO / "configs/tiny.yaml"), working_dir=str(REPO)))["env_vars"]
    assert "tok-abcdef123" not in str(env) and "MLFLOW_TRACKING_TOKEN" not in env


def test_cli_error_does_not_echo_the_secret():
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "launchers.cli",
            "submit",
            "slurm",
            "--config",
            "configs/tiny.yaml",
            "--dry-run",
            "tracking.tracking_uri=https://alice:hunter5@mlflow.example",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "no credentials" in r.stderr and "hunter5" not in r.stderr + r.stdout
