"""Ray encoding on a local 2-CPU Ray instance (2 workers): equals in-process encoding, survives a killed worker
with every passage encoded exactly once, skips finished shards on re-run; Ray-parallel search == local search."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from lancer_dist.config import ModelConfig
from lancer_dist.retrieval.collections import Collection
from lancer_dist.retrieval.encode import EncoderPool, encode_corpus_local
from lancer_dist.retrieval.encoder_io import EncoderSpec, load_encoder
from lancer_dist.retrieval.search import search_store
from lancer_dist.retrieval.store import CorpusFormatError, EmbeddingStore
from lancer_dist.retrieval.tiny import write_tiny_encoder
from tests.tiny_models import GREEK

WORDS = GREEK


def _corpus(n: int) -> dict[str, dict[str, str]]:
    rng = np.random.default_rng(0)
    return {
        f"d{i:03d}": {
            "text": " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12)))),
            "lang": ["en", "fr"][i % 2],
        }
        for i in range(n)
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_env):
    root = tmp_path_factory.mktemp("enc")
    corpus = _corpus(120)
    Collection(corpus, {"q1": {"text": "alpha beta", "lang": "en"}}, {"q1": {"d000": 1}}).write_beir(
        root / "coll"
    )
    model = write_tiny_encoder(root / "model", [d["text"] for d in corpus.values()] + ["alpha beta"])
    spec = EncoderSpec(
        str(model), ModelConfig(query_prefix="query: ", passage_prefix="passage: ", max_passage_length=32)
    )
    ref = load_encoder(spec, "cpu").encode([d["text"] for d in corpus.values()], is_query=False)
    with EncoderPool(spec, num_workers=2) as pool:  # one pool (2 actors, model loaded once each) per module
        yield root, corpus, spec, ref, pool


def _check_store(path, corpus, ref):
    store = EmbeddingStore(path)
    emb, ids, langs = store.load_all()
    assert ids == list(corpus)  # every passage exactly once, in corpus order
    assert langs == [d["lang"] for d in corpus.values()]
    np.testing.assert_allclose(emb, ref, atol=1e-5)
    return store


def test_ray_pool_matches_in_process(ray_env, setup):
    root, corpus, spec, ref, pool = setup
    res = pool.encode_corpus(root / "coll", root / "out_ray", shard_size=16, progress=False)
    assert res.num_shards == 8 and res.encoded_shards == 8 and res.worker_failures == 0
    _check_store(root / "out_ray", corpus, ref)
    local = encode_corpus_local(spec, root / "coll", root / "out_local", shard_size=16, progress=False)
    assert local.encoded_shards == 8
    a = EmbeddingStore(root / "out_ray").load_all()[0]
    np.testing.assert_allclose(a, EmbeddingStore(root / "out_local").load_all()[0], atol=1e-6)

    # Re-running skips every finished shard and rewrites none of them.
    mtimes = {p.name: p.stat().st_mtime_ns for p in (root / "out_ray").glob("emb-*.npy")}
    again = pool.encode_corpus(root / "coll", root / "out_ray", shard_size=16, progress=False)
    assert again.encoded_shards == 0 and again.skipped_shards == 8
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (root / "out_ray").glob("emb-*.npy")}

    # An interrupted job (a shard missing) resumes by encoding only that shard.
    (root / "out_ray" / "ids-00003.json").unlink()
    resumed = pool.encode_corpus(root / "coll", root / "out_ray", shard_size=16, progress=False)
    assert resumed.encoded_shards == 1
    _check_store(root / "out_ray", corpus, ref)

    # Mixing settings in one directory is refused, naming the field.
    with pytest.raises(ValueError, match="'dtype'"):
        pool.encode_corpus(root / "coll", root / "out_ray", shard_size=16, dtype="float16", progress=False)


def test_killed_worker_job_finishes_exactly_once(ray_env, setup):
    root, corpus, _spec, ref, pool = setup
    killed: list[int] = []

    def kill_a_busy_worker(job: EncoderPool, result: dict) -> None:
        if killed:
            return
        slot = (
            next(s for s in job.in_flight if s != 0) if len(job.in_flight) > 1 else next(iter(job.in_flight))
        )
        killed.append(job.pids[slot])
        os.kill(job.pids[slot], signal.SIGKILL)

    res = pool.encode_corpus(
        root / "coll", root / "out_kill", shard_size=10, progress=False, on_shard_done=kill_a_busy_worker
    )
    assert killed and res.worker_failures == 1
    assert res.encoded_shards == 12
    manifest = json.loads((root / "out_kill" / "manifest.json").read_text())
    attempts = [s["attempts"] for s in manifest["shards"]]
    assert sum(attempts) == 12 + 1 and max(attempts) == 2  # exactly one shard was redone
    assert killed[0] not in pool.pids.values() and len(pool.pids) == 2  # a replacement worker took over
    _check_store(root / "out_kill", corpus, ref)


def test_corpus_records_local(ray_env, setup, tmp_path):
    _root, _corpus, spec, _ref, _pool = setup
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"_id": "a", "text": "alpha"}\n{"_id": "b", "txt": "beta"}\n')
    with pytest.raises(CorpusFormatError, match=r"corpus.jsonl: record 'line 2' field 'text'"):
        encode_corpus_local(spec, bad, tmp_path / "out", shard_size=5, progress=False)
    # Passages without any text are left out and counted (as read_beir does); positions stay consistent.
    ok = tmp_path / "ok.jsonl"
    ok.write_text(
        '{"_id": "a", "text": "alpha"}\n\n{"_id": "e", "text": " ", "title": ""}\n{"_id": "b", "text": "beta"}\n'
    )
    res = encode_corpus_local(spec, ok, tmp_path / "ok", shard_size=2, progress=False)
    assert res.manifest["skipped_no_text"] == 1 and res.manifest["num_passages"] == 2
    store = EmbeddingStore(tmp_path / "ok")
    assert store.all_ids() == ["a", "b"]
    q = load_encoder(spec, "cpu").encode(["beta"], is_query=True)
    assert search_store(tmp_path / "ok", q, 2, parallel="none").docids[0][0] in ("a", "b")


def test_float16_and_ray_search_last(ray_env, setup):
    root, _corpus, spec, _ref, pool = setup
    pool.encode_corpus(root / "coll", root / "out_f16", shard_size=40, dtype="float16", progress=False)
    emb, _, _ = EmbeddingStore(root / "out_f16").load_shard(0)
    assert emb.dtype == np.float16
    q = pool.encode_texts(["alpha beta", "gamma", "delta"], is_query=True)
    np.testing.assert_allclose(
        q, load_encoder(spec, "cpu").encode(["alpha beta", "gamma", "delta"], True), atol=1e-5
    )
    pool.close()  # the actors hold both CPUs; search tasks need them (this test runs last in the module)
    via_ray = search_store(root / "out_f16", q, 10, parallel="ray")
    local = search_store(root / "out_f16", q, 10, parallel="none")
    np.testing.assert_array_equal(via_ray.positions, local.positions)
    assert via_ray.docids == local.docids


def test_workers_that_cannot_start_are_dropped_or_named(ray_env, setup, tmp_path, caplog):
    """An encoding actor Ray cannot place (its CPUs held by other work) must not hang the job: after the start
    timeout the pool goes on with those that started, or fails naming what was asked and what was free."""
    import logging

    import ray

    root, corpus, spec, ref, pool = setup
    pool.close()  # the module pool's actors held both CPUs

    @ray.remote(num_cpus=1)
    class Holder:
        def ready(self) -> bool:
            return True

    holder = Holder.remote()  # type: ignore[attr-defined]
    try:
        assert ray.get(holder.ready.remote(), timeout=60)
        with (
            caplog.at_level(logging.WARNING, logger="lancer_dist.retrieval.encode"),
            EncoderPool(spec, num_workers=2, start_timeout_s=15) as two,
        ):
            assert len(two.actors) == 1 and len(two.pids) == 1
            res = two.encode_corpus(root / "coll", tmp_path / "one", shard_size=40, progress=False)
        assert res.encoded_shards == 3 and res.worker_failures == 0
        _check_store(tmp_path / "one", corpus, ref)
        assert "1 of 2 encoding worker(s) did not start within 15 s" in caplog.text
        assert "each asks for 1 CPU(s) and 0 GPU(s)" in caplog.text and "free of 2 CPU" in caplog.text
        assert "going on with 1 worker(s)" in caplog.text

        with pytest.raises(RuntimeError, match=r"1 of 1 encoding worker\(s\) did not start within 3 s") as e:
            EncoderPool(spec, num_workers=1, cpus_per_worker=2, start_timeout_s=3)
        assert "each asks for 2 CPU(s)" in str(
            e.value
        ) and "the cluster has 1 CPU, 0 GPU free of 2 CPU" in str(e.value)
    finally:
        ray.kill(holder)
