"""A real ``mlflow server`` goes away in the middle of a run and comes back: training never waits, nothing is lost.

One server (module-scoped: it takes ~15-30 s to start on 2 cores) serves both tests:
* outage: log while up, stop the server, keep logging (calls return at once, one warning), restart it on the same
  port, finish -> every step of every metric, the params and the artifacts are on the server, read back with
  MlflowClient;
* the server is unreachable for a whole run: ``finish()`` gives up after its timeout, leaves the records in the spool
  and says how to upload them; ``upload_spool`` later delivers them.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from lancer_dist.cli import main as lancer_main
from lancer_dist.config import RunConfig, TrackingConfig, config_to_dict
from lancer_dist.tracking import SPOOL_DIRNAME, Tracker, upload_spool
from tests.servers import MlflowServer, free_port

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with MlflowServer(tmp_path_factory.mktemp("mlflow-server")) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _short_http(monkeypatch: pytest.MonkeyPatch):
    # What Tracker.start sets by default for http URIs, made explicit (and undone after the test).
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")


def _timed_log(tracker: Tracker, steps: range) -> float:
    """Log two metrics per step; returns the slowest call in seconds."""
    worst = 0.0
    for s in steps:
        t0 = time.perf_counter()
        tracker.log_metrics({"loss": 1.0 / (s + 1), "lr": 1e-3 * s}, step=s)
        worst = max(worst, time.perf_counter() - t0)
    return worst


def test_server_outage_and_recovery(server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="lancer_dist.tracking")
    cfg = RunConfig()
    cfg.tracking = TrackingConfig(tracking_uri=server.uri, experiment="outage", retry_seconds=0.5)
    run_dir = tmp_path / "run"
    tracker = Tracker(cfg.tracking, run_dir=run_dir, rank=0)
    run_id = tracker.start(config_to_dict(cfg), run_name="outage")
    assert run_id is not None

    _timed_log(tracker, range(0, 10))
    (tmp_path / "before.txt").write_text("logged while the server was up")
    tracker.log_artifact(tmp_path / "before.txt")
    assert tracker.flush(timeout_s=60)

    server.stop()
    worst = _timed_log(tracker, range(10, 30))
    (tmp_path / "during.txt").write_text("logged during the outage")
    tracker.log_artifact(tmp_path / "during.txt", artifact_path="outage")
    (tmp_path / "during.txt").write_text("changed after logging: the spool copy is what gets uploaded")
    tracker.log_dict({"phase": "outage", "steps": 20}, "outage/state.json")
    # Training is not held up: every call only appends to the local journal.
    assert worst < 0.2, f"a log call took {worst:.3f} s during the outage"
    assert not tracker.flush(timeout_s=2.0)
    undelivered = tracker.undelivered()
    assert undelivered["metrics"] >= 2 and undelivered["artifacts"] >= 1, undelivered
    warnings = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]

    _timed_log(tracker, range(30, 35))
    server.start()  # same port, same store
    _timed_log(tracker, range(35, 40))
    tracker.finish(timeout_s=120)
    assert tracker.undelivered() == {"metrics": 0, "params": 0, "tags": 0, "artifacts": 0, "other": 0}
    # Exactly one outage warning, and a note that the server is back.
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in msgs) == 1, msgs
    assert any("reachable again" in m for m in msgs), msgs
    # A fully delivered spool keeps only its state (the run id, for resuming).
    assert sorted(p.name for p in (run_dir / SPOOL_DIRNAME).iterdir()) == ["state.json"]
    assert Tracker.stored_run_id(run_dir) == run_id

    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == str(cfg.train.lr)
    assert run.data.params["tracking.tracking_uri"] == server.uri
    for key in ("loss", "lr"):
        hist = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in hist) == list(range(40)), key
    loss = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert loss[17] == pytest.approx(1 / 18)
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"before.txt", "outage"} <= top
    assert {a.path for a in client.list_artifacts(run_id, "outage")} == {
        "outage/during.txt",
        "outage/state.json",
    }
    got = Path(client.download_artifacts(run_id, "outage/during.txt", str(tmp_path / "dl")))
    assert got.read_text() == "logged during the outage"
    state = json.loads(
        Path(client.download_artifacts(run_id, "outage/state.json", str(tmp_path / "dl"))).read_text()
    )
    assert state == {"phase": "outage", "steps": 20}


def test_unreachable_for_the_whole_run_then_upload(
    server: MlflowServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.WARNING, logger="lancer_dist.tracking")
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    cfg = TrackingConfig(tracking_uri=dead, experiment="late", retry_seconds=0.3)
    run_dir = tmp_path / "run"
    tracker = Tracker(cfg, run_dir=run_dir, rank=0, start_timeout_s=10)
    t0 = time.perf_counter()
    assert tracker.start({"model": {"name_or_path": "x"}, "seed": 3}) is None  # the run cannot be created yet
    assert time.perf_counter() - t0 < 10
    worst = _timed_log(tracker, range(25))
    assert worst < 0.2
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    tracker.log_model_dir(tmp_path / "m")
    t0 = time.perf_counter()
    tracker.finish(timeout_s=2)
    assert time.perf_counter() - t0 < 20
    left = tracker.undelivered()
    assert left["metrics"] == 50 and left["artifacts"] == 1 and left["params"] == 2, left
    msgs = [r.getMessage() for r in caplog.records]
    assert any("could not be delivered" in m and "lancer tracking upload" in m for m in msgs), msgs

    # Later, with a reachable server: deliver everything the run left behind, in order, into a new run.
    # (the command the error message prints, `lancer tracking upload`, run in-process)
    assert (
        lancer_main(["tracking", "upload", str(run_dir), "--tracking-uri", server.uri, "--timeout", "120"])
        == 0
    )
    run_id = Tracker.stored_run_id(run_dir)
    assert run_id is not None
    client = MlflowClient(server.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"model.name_or_path": "x", "seed": "3"}
    assert sorted(m.step for m in client.get_metric_history(run_id, "loss")) == list(range(25))
    assert {a.path for a in client.list_artifacts(run_id, "model")} == {"model/config.json"}
    assert upload_spool(run_dir, tracking_uri=server.uri, timeout_s=10)  # nothing left: a no-op
