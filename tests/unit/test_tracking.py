"""Tracker against the default embedded sqlite store: contents read back with MlflowClient, rank-0 gating, resume,
redaction and truncation of params, and the spool bookkeeping."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lancer_dist.config import RunConfig, TrackingConfig, config_to_dict
from lancer_dist.tracking import SPOOL_DIRNAME, Tracker, resolve_tracking_uri, upload_spool


def _client(tracker: Tracker) -> MlflowClient:
    return MlflowClient(tracker.tracking_uri)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One sqlite store shared by the tests below (creating its tables takes seconds on 2 busy cores)."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


def test_default_sqlite_store_contents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the current directory (MLflow's ./mlruns default)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.setenv("MY_API_TOKEN", "s3cr3t-value-123")
    cfg = RunConfig()
    cfg.tracking = TrackingConfig(experiment="unit", run_name="from-config")
    cfg.model.backbone_config = {"model_type": "bert", "hidden_size": 8, "note": "x" * 7000}
    cfg.model.tokenizer = "tok"
    params = config_to_dict(cfg)
    params["db_password"] = "hunter2"  # a secret-named key: must never reach MLflow
    run_dir = tmp_path / "runs" / "a"
    tracker = Tracker(cfg.tracking, run_dir=run_dir, rank=0)
    assert tracker.tracking_uri == f"sqlite:///{(tmp_path / 'runs' / 'a' / 'mlflow.db').resolve()}"
    run_id = tracker.start(params)
    assert run_id is not None and tracker.run_id == run_id

    for step in range(0, 30, 10):
        tracker.log_metrics({"loss/total": 2.0 - step / 100, "lr": 1e-4}, step=step)
    tracker.set_tags({"stage": "unit", "hf_token": "abc"})
    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 2}}')
    tracker.log_artifact(tmp_path / "ds.json", artifact_path="configs")
    tracker.log_dict(params, "configs/run.yaml")
    tracker.log_text("uses token s3cr3t-value-123 from the environment", "notes.txt")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "1_Pooling").mkdir()
    (model / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    tracker.log_model_dir(model)
    from matplotlib.figure import Figure

    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    tracker.log_figure(fig, "probe/curve.png")
    tracker.finish()

    client = _client(tracker)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "from-config"
    assert client.get_experiment(run.info.experiment_id).name == "unit"
    p = run.data.params
    assert p["train.lr"] == str(cfg.train.lr) and p["name"] == cfg.name
    assert p["db_password"] == "***"
    # Nested dicts are flattened; an over-long value is cut to MLflow's 6000 characters and marked.
    assert len(p["model.backbone_config.note"]) == 6000 and p["model.backbone_config.note"].endswith(
        "[truncated]"
    )
    assert p["data.erasure.languages"] == "[]"
    assert run.data.tags["stage"] == "unit" and run.data.tags["hf_token"] == "***"
    hist = client.get_metric_history(run_id, "loss/total")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(0, 2.0), (10, 1.9), (20, 1.8)]

    arts = {a.path for a in client.list_artifacts(run_id)}
    assert arts == {"configs", "notes.txt", "model", "probe"}
    assert {a.path for a in client.list_artifacts(run_id, "configs")} == {
        "configs/ds.json",
        "configs/run.yaml",
    }
    assert {a.path for a in client.list_artifacts(run_id, "model")} == {
        "model/config.json",
        "model/1_Pooling",
    }
    dl = tmp_path / "dl"
    notes = Path(client.download_artifacts(run_id, "notes.txt", str(dl))).read_text()
    assert "s3cr3t" not in notes and "***" in notes
    png = Path(client.download_artifacts(run_id, "probe/curve.png", str(dl))).read_bytes()
    assert png[:4] == b"\x89PNG"
    # Artifacts live next to the database, not under the current directory.
    assert (tmp_path / "runs" / "a" / "mlartifacts").is_dir()
    assert list((tmp_path / "cwd").iterdir()) == []
    # Delivered: the spool keeps only its state file.
    assert [q.name for q in (run_dir / SPOOL_DIRNAME).iterdir()] == ["state.json"]


def test_other_ranks_and_disabled_are_noops(tmp_path: Path):
    cfg = TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/never.db")
    for tracker in (
        Tracker(cfg, run_dir=tmp_path / "r1", rank=1),
        Tracker(cfg, run_dir=tmp_path / "r0", rank=0, enabled=False),
        Tracker(TrackingConfig(enabled=False), run_dir=tmp_path / "r0b", rank=0),
    ):
        assert not tracker.active
        assert tracker.start({"a": 1}) is None
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_artifact(tmp_path / "does-not-exist")  # not even looked at
        tracker.log_dict({"a": 1}, "a.json")
        tracker.set_tags({"a": "b"})
        assert tracker.flush(1.0)
        tracker.finish()
        assert tracker.run_id is None
    assert list(tmp_path.iterdir()) == []  # no file, no database, no spool


def test_rank_defaults_to_env_before_process_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RANK", "3")
    assert Tracker(TrackingConfig(), run_dir=tmp_path).rank == 3
    monkeypatch.delenv("RANK")
    assert Tracker(TrackingConfig(), run_dir=tmp_path).rank == 0


def test_resume_continues_the_same_run(store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    cfg = TrackingConfig(tracking_uri=store, experiment="resume")
    run_dir = tmp_path / "run"
    first = Tracker(cfg, run_dir=run_dir, rank=0)
    run_id = first.start({"train": {"steps": 10, "lr": 0.1}})
    first.log_metrics({"loss": 1.0}, step=0)
    first.finish(status="KILLED")
    assert Tracker.stored_run_id(run_dir) == run_id

    caplog.set_level(logging.WARNING, logger="lancer_dist.tracking")
    second = Tracker(cfg, run_dir=run_dir, rank=0)
    # A resumed run with a changed setting: params are immutable in MLflow, so the change becomes a tag.
    assert second.start({"train": {"steps": 20, "lr": 0.1}, "extra": 1}, resume_run_id="auto") == run_id
    second.log_metrics({"loss": 0.5}, step=1)
    second.finish()

    third = Tracker(cfg, run_dir=tmp_path / "other", rank=0)
    assert third.start({"train": {"steps": 20, "lr": 0.1}}, resume_run_id=run_id) == run_id
    third.log_metrics({"loss": 0.25}, step=2)
    third.finish()

    client = MlflowClient(cfg.tracking_uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.steps": "10", "train.lr": "0.1", "extra": "1"}
    assert run.data.tags["resumed.train.steps"] == "20"
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss")) == [
        (0, 1.0),
        (1, 0.5),
        (2, 0.25),
    ]
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert any("params changed" in r.getMessage() for r in caplog.records)

    # Without resume a new run is created in the same experiment.
    fresh = Tracker(cfg, run_dir=run_dir, rank=0)
    new_id = fresh.start({"a": 1})
    fresh.finish()
    assert new_id not in (None, run_id)
    assert Tracker.stored_run_id(run_dir) == new_id


def test_spool_left_by_a_crash_is_delivered_first(
    store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A process that died before delivering (records only in the journal) is caught up by the next tracker."""
    cfg = TrackingConfig(tracking_uri=store, experiment="crash")
    run_dir = tmp_path / "run"
    spool = run_dir / SPOOL_DIRNAME
    # What a killed process leaves: a journal whose records were never delivered (offset 0, no run yet).
    spool.mkdir(parents=True)
    records = [
        {
            "kind": "start",
            "experiment": "crash",
            "run_name": "killed",
            "resume": None,
            "tags": {},
            "ts": 1000,
        },
        {"kind": "params", "p": {"seed": "1"}},
        # A record the store rejects (invalid key): reported and skipped, it must not block what follows.
        {"kind": "tags", "t": {"bad@tag": "x"}},
        *({"kind": "metrics", "step": s, "ts": 1000 + s, "m": {"loss": float(s)}} for s in range(1500)),
    ]
    (spool / "journal.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (spool / "state.json").write_text(json.dumps({"offset": 0, "run_id": None}))

    resumed = Tracker(cfg, run_dir=run_dir, rank=0)
    run_id = resumed.start({"seed": 1}, resume_run_id="auto")
    resumed.log_metrics({"loss": -1.0}, step=1500)
    resumed.finish()
    assert run_id is not None
    client = MlflowClient(cfg.tracking_uri)
    assert client.get_run(run_id).info.run_name == "killed"
    hist = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in hist) == list(
        range(1501)
    )  # 1500 values span two log_batch calls of <= 1000
    assert upload_spool(run_dir) is True  # nothing left
    assert json.loads((run_dir / SPOOL_DIRNAME / "state.json").read_text())["skipped"] == 1
    assert any("rejected 1 tags record" in r.getMessage() for r in caplog.records)


def test_bad_names_and_missing_files_fail_fast(store: str, tmp_path: Path):
    tracker = Tracker(TrackingConfig(tracking_uri=store, experiment="names"), run_dir=tmp_path / "r", rank=0)
    with pytest.raises(RuntimeError, match="start"):
        tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.start({})
    with pytest.raises(ValueError, match="invalid MLflow metric name"):
        tracker.log_metrics({"loss@top": 1.0}, step=0)
    with pytest.raises(ValueError, match="invalid MLflow metric name"):
        tracker.log_metrics({"a/../b": 1.0}, step=0)
    with pytest.raises(FileNotFoundError, match=r"nothing\.bin"):
        tracker.log_artifact(tmp_path / "nothing.bin")
    tracker.finish()
    with pytest.raises(RuntimeError, match="finish"):
        tracker.log_metrics({"loss": 1.0}, step=1)


def test_resolve_tracking_uri(tmp_path: Path):
    assert (
        resolve_tracking_uri("", tmp_path / "out" / "run")
        == f"sqlite:///{(tmp_path / 'out' / 'run').resolve()}/mlflow.db"
    )
    assert resolve_tracking_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
