"""Issue 14, items 3 and 5, end to end with real components (Ray, FAISS, a real `mlflow server`):

* `lancer eval` against a tracking server that is down (a closed 127.0.0.1 port, with a password in the URI) runs to
  the end, says the store is unreachable without printing the password anywhere, keeps every record in its on-disk
  outbox, and delivers it all to the real server when that comes up later; artifacts land in the server's store,
  never in `<cwd>/mlruns`.
* a collection listed twice is refused before anything is written (on main it wrote embeddings into the input
  collection's directory, then crashed on a metric name containing its path).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from lancer_dist.cli import main
from lancer_dist.retrieval.tiny import write_tiny_encoder
from tests.integration.test_eval import _collections
from tests.servers import MlflowServer, free_port

SECRET = "S3cr3t-pw-91"


def _tree_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: Any) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evalrel")
    texts = _collections(root)
    return root, write_tiny_encoder(root / "base", texts, seed=0)


def _config(root: Path, base: Path, out: Path, collections: list[Path], tracking: dict[str, Any]) -> Path:
    cfg = {
        "name": "rel-eval",
        "output_dir": str(out),
        "model": {"name_or_path": str(base), "max_query_length": 16, "max_passage_length": 16},
        "tracking": tracking,
        "eval": {
            "collections": [str(c) for c in collections],
            "shard_size": 25,
            "top_k": 20,
            "num_workers": 1,
            "recall_kt": [20],
            "baselines": ["lsar"],
            "probe_per_language": 10,
            "tsne_samples": 0,
            "pool_growth_collection": "none",
        },
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_eval_survives_a_down_tracking_server_and_delivers_later(
    tiny: tuple[Path, Path], ray_env: None, tmp_path: Path, capfd: Any, caplog: Any, monkeypatch: Any
) -> None:
    root, base = tiny
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    port = free_port()  # nothing listens there: connection refused, like a server that is down
    uri = f"http://alice:{SECRET}@127.0.0.1:{port}"
    colls = [root / "coll" / "multilingual", root / "coll" / "crosslingual"]
    cfg = _config(
        root,
        base,
        tmp_path / "run",
        colls,
        {
            "tracking_uri": uri,
            "experiment": "rel-eval",
            "retry_seconds": 1,
            "start_timeout_s": 5,
            "finish_timeout_s": 5,
        },
    )
    caplog.set_level(logging.WARNING)
    t0 = time.monotonic()
    assert main(["eval", "--config", str(cfg)]) == 0
    took = time.monotonic() - t0
    out, err = capfd.readouterr()
    logs = caplog.text
    res = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert set(res["results"]) == {"base", "base+LSAR"}

    # Not silent: the outage is reported with the URI redacted; the password is nowhere (output, logs, files).
    assert f"alice:***@127.0.0.1:{port}" in out + err + logs
    assert "could not be delivered" in out + err + logs
    assert SECRET not in out + err + logs
    assert SECRET.encode() not in _tree_bytes(tmp_path / "run")
    # Not stalled by the store: the start and the end wait 5 s each (+ request timeouts).
    assert took < 120, took

    # Everything is kept in the outbox; a real server comes up later on the same port and receives all of it.
    spool = tmp_path / "run" / "eval" / "mlflow_spool"
    assert (spool / "journal.jsonl").stat().st_size > 0
    from lancer_dist.tracking import upload_spool

    with MlflowServer(tmp_path / "mlflow", port=port) as srv:
        assert upload_spool(tmp_path / "run" / "eval", tracking_uri=uri, timeout_s=180, retry_seconds=1)
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=srv.uri)
        exp = client.get_experiment_by_name("rel-eval")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED"
        run = runs[0]
        metrics = run.data.metrics
        assert metrics["base/multilingual/all/nDCG_at_10"] == pytest.approx(
            res["results"]["base"]["multilingual"]["all"]["nDCG@10"]
        )
        assert metrics["baseplus_LSAR/crosslingual/fr/RR_at_10"] == pytest.approx(
            res["results"]["base+LSAR"]["crosslingual"]["fr"]["RR@10"]
        )
        assert "base/probe_language_id_accuracy" in metrics
        n_values = sum(
            not math.isnan(x)
            for v in res["results"].values()
            for c in v.values()
            for ms in c.values()
            for x in ms.values()
        )
        assert len([k for k in metrics if "probe" not in k]) == n_values
        assert run.data.params["eval.top_k"] == "20"
        arts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
        assert {"eval/table.md", "eval/results.json", "eval/table2.json"} <= arts
    # The artifacts are in the server's store, not in the current directory.
    assert (tmp_path / "mlflow" / "artifacts").is_dir()
    assert any(p.name == "table.md" for p in (tmp_path / "mlflow" / "artifacts").rglob("*"))
    assert not (cwd / "mlruns").exists() and not list(cwd.iterdir())


def test_eval_artifacts_go_to_the_configured_sqlite_store(
    tiny: tuple[Path, Path], ray_env: None, tmp_path: Path, monkeypatch: Any
) -> None:
    root, base = tiny
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    store = tmp_path / "store"
    cfg = _config(
        root,
        base,
        tmp_path / "run",
        [root / "coll" / "multilingual"],
        {"tracking_uri": f"sqlite:///{store}/mlflow.db", "experiment": "rel-eval-sqlite"},
    )
    assert main(["eval", "--config", str(cfg), "eval.baselines=[]"]) == 0
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("rel-eval-sqlite").experiment_id])[0]
    assert run.info.artifact_uri.startswith((store / "mlartifacts").as_uri())
    assert any(p.name == "table.md" for p in (store / "mlartifacts").rglob("*"))
    assert not (cwd / "mlruns").exists() and not list(cwd.iterdir())


def test_collection_listed_twice_is_refused_and_nothing_is_written(
    tiny: tuple[Path, Path], ray_env: None, tmp_path: Path, capsys: Any
) -> None:
    root, base = tiny
    coll = root / "coll" / "crosslingual"
    before = sorted(p.relative_to(coll) for p in coll.rglob("*"))
    cfg = _config(
        root,
        base,
        tmp_path / "run",
        [coll, root / "coll" / "multilingual", Path(str(coll) + "/")],
        {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
    )
    assert main(["eval", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "eval.collections" in err and "entries 0 and 2" in err, err
    assert sorted(p.relative_to(coll) for p in coll.rglob("*")) == before  # nothing written into the input
