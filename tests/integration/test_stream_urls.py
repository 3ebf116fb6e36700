"""Shards read through webdataset's own opening: ``http://`` from a local HTTP server on 127.0.0.1 (a real
``http.server`` process, fetched by webdataset's curl pipe), ``file://`` and ``pipe:cat``. Training batches equal
those from the same local files, step for step on every rank; resume from the HTTP source is exact (also from a
state saved by a run on the local files); a missing or truncated remote shard is a DataError naming it, or skipped
and counted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from lancer_dist.data.errors import DataError
from lancer_dist.data.shards import read_manifest
from lancer_dist.data.stream import TrainStream
from tests.servers import FileHttpServer
from tests.unit.test_stream import make_cfg, make_tokenizer, run_all, same_batch


@pytest.fixture(scope="module")
def tok() -> Any:
    return make_tokenizer()


def _same(a: Any, b: Any) -> bool:
    return same_batch(a, b) and a.query_positive_docids == b.query_positive_docids


def _url_cfg(tmp_path: Path, erasure: str, retrieval: str, **over: Any) -> Any:
    return make_cfg(tmp_path, **{"data.erasure.path": erasure, "data.retrieval.path": retrieval, **over})


def test_http_file_and_pipe_urls_give_the_local_batches(tmp_path: Path, tok: Any) -> None:
    local = run_all(make_cfg(tmp_path), tok, world=2)  # writes tmp_path/erasure and tmp_path/retrieval
    m = read_manifest(tmp_path / "erasure")
    with FileHttpServer(tmp_path, tmp_path / "http.log") as srv:
        sources = {
            "http": (f"{srv.url}/erasure", f"{srv.url}/retrieval/manifest.json"),
            "file": (f"file://{tmp_path}/erasure", f"file://{tmp_path}/retrieval/"),
            "pipe": (f"pipe:cat {tmp_path}/erasure/{{}}", f"pipe:cat {tmp_path}/retrieval/{{}}"),
        }
        for name, (e, r) in sources.items():
            got = run_all(_url_cfg(tmp_path, e, r), tok, world=2)
            for rank in range(2):
                assert len(got[rank]) == 12, name
                assert all(_same(a, b) for a, b in zip(got[rank], local[rank], strict=True)), name
        served = srv.requests()
    # the http run really read every erasure shard over HTTP (each rank, each epoch), all answered 200
    paths = {p for p, status in served if status == 200}
    assert {f"/erasure/{s.name}" for s in m.shards} <= paths and "/retrieval/manifest.json" in paths
    assert all(status == 200 for _, status in served)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_http_is_exact(tmp_path: Path, tok: Any, workers: int) -> None:
    local_cfg = make_cfg(tmp_path, **{"data.num_workers": workers})
    full = run_all(local_cfg, tok, world=2)
    with FileHttpServer(tmp_path, tmp_path / "http.log") as srv:
        cfg = _url_cfg(
            tmp_path, f"{srv.url}/erasure", f"{srv.url}/retrieval", **{"data.num_workers": workers}
        )
        for r in range(2):
            st = TrainStream.from_config(cfg, tok, rank=r, world_size=2)
            it = iter(st)
            for _ in range(5):  # steps 0..4 consumed (workers prefetched further), then the process "dies"
                next(it)
            del it
            sd = json.loads(json.dumps(st.state_dict()))
            resumed = TrainStream.from_config(cfg, tok, rank=r, world_size=2, start_step=5)
            resumed.load_state_dict(sd)
            got = list(resumed)
            assert [b.step for b in got] == list(range(5, 12))
            assert all(_same(a, b) for a, b in zip(got, full[r][5:], strict=True))
        # a state saved while training on the local files resumes on the http source (same shards, same fingerprint)
        st = TrainStream.from_config(local_cfg, tok, rank=1, world_size=2)
        it = iter(st)
        for _ in range(8):
            next(it)
        del it
        resumed = TrainStream.from_config(cfg, tok, rank=1, world_size=2, start_step=8)
        resumed.load_state_dict(json.loads(json.dumps(st.state_dict())))
        assert all(_same(a, b) for a, b in zip(list(resumed), full[1][8:], strict=True))


def test_missing_or_truncated_remote_shard(tmp_path: Path, tok: Any) -> None:
    make_cfg(tmp_path)
    served = tmp_path / "served"
    shutil.copytree(tmp_path / "retrieval", served / "retrieval")
    m = read_manifest(served / "retrieval")
    gone, cut = m.shards[1].name, m.shards[3].name
    (served / "retrieval" / gone).unlink()
    data = (served / "retrieval" / cut).read_bytes()
    (served / "retrieval" / cut).write_bytes(data[: len(data) // 2])
    with FileHttpServer(served, tmp_path / "http.log") as srv:
        cfg = _url_cfg(
            tmp_path, str(tmp_path / "erasure"), f"{srv.url}/retrieval", **{"data.shuffle_buffer": 0}
        )
        with pytest.raises(
            DataError, match=rf"{gone} \(in http://127\.0\.0\.1:\d+/retrieval\): .*field 'file'"
        ):
            list(TrainStream.from_config(cfg, tok, rank=0, world_size=1))
        cfg = _url_cfg(
            tmp_path,
            str(tmp_path / "erasure"),
            f"{srv.url}/retrieval",
            **{"data.shuffle_buffer": 0, "data.skip_bad_records": True},
        )
        st = TrainStream.from_config(cfg, tok, rank=0, world_size=1)
        batches = list(st)
    assert len(batches) == 12
    stats = st.stats
    assert stats["bad_shards.missing_shard"] >= 1 and stats["bad_shards.corrupt_tar"] >= 1, stats
    # nothing of the missing shard was trained on; the truncated one gave at most the records before the cut
    used = {k for b in batches for k in b.query_keys}
    gone_keys = {k for k, _ in _local_records(tmp_path / "retrieval", gone)}
    assert not used & gone_keys


def _local_records(root: Path, name: str) -> list[tuple[str, Any]]:
    from lancer_dist.data.shards import load_shard

    m = read_manifest(root)
    return load_shard(m, next(s for s in m.shards if s.name == name))


def test_whole_shard_readers_inspect_and_probe_over_http(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The readers that take a shard whole (load_shard: the probe, `lancer data inspect --verify`) read the same
    records from the HTTP server as from the files."""
    from lancer_dist.cli import main
    from lancer_dist.data.shards import load_shard
    from lancer_dist.train.probe import load_probe_pool

    make_cfg(tmp_path)
    local = read_manifest(tmp_path / "erasure")
    with FileHttpServer(tmp_path, tmp_path / "http.log") as srv:
        remote = read_manifest(f"{srv.url}/erasure")
        assert remote.remote and remote.shards == local.shards
        for s in local.shards:
            assert load_shard(remote, s) == load_shard(local, s)
        pool = load_probe_pool(f"{srv.url}/erasure", None, 3, skip_bad=False, seed=1)
        assert pool[:2] == load_probe_pool(tmp_path / "erasure", None, 3, skip_bad=False, seed=1)[:2]
        assert main(["data", "inspect", f"{srv.url}/erasure", "--verify"]) == 0
        assert json.loads(capsys.readouterr().out)["verified"] == {"shards": len(local.shards), "records": 51}
        assert main(["data", "inspect", f"{srv.url}/nothing-here"]) == 1
        assert "cannot read the manifest" in capsys.readouterr().err


def test_a_manifest_cannot_inject_a_command_into_a_pipe_url(tmp_path: Path) -> None:
    make_cfg(tmp_path)
    d = tmp_path / "retrieval"
    man = json.loads((d / "manifest.json").read_text())
    bad = f"x.tar;touch {tmp_path / 'PWNED'}"
    man["shards"][0]["name"] = bad
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match=r"field 'shards\.name'.*not \[A-Za-z0-9\._-\] only"):
        read_manifest(f"pipe:cat {d}/{{}}")
    with pytest.raises(DataError, match=r"shards\.name"):
        read_manifest(d)
    assert not (tmp_path / "PWNED").exists()
