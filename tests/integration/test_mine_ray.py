"""``lancer data mine`` end to end on a local 2-CPU Ray instance (2 encoding actors): the CLI's groups equal the
in-process mining of the same collection (which tests/unit/test_mine.py checks against a numpy reference), and
no group holds a positive (the margin is off here: it is checked in the unit test). Run under ``flock /tmp/lancer-ray.lock``."""

from __future__ import annotations

import json

import numpy as np

from lancer_dist.cli import main
from lancer_dist.data.shards import load_shard, read_manifest
from lancer_dist.retrieval.collections import Collection
from lancer_dist.retrieval.encoder_io import EncoderSpec
from lancer_dist.retrieval.mine import MineOptions, mine_hard_negatives
from lancer_dist.retrieval.tiny import write_tiny_encoder
from tests.tiny_models import GREEK

WORDS = GREEK


def _groups(out) -> dict[str, dict]:
    m = read_manifest(out)
    return {rec["query_id"]: rec for s in m.shards for _, rec in load_shard(m, s)}


def test_cli_mines_with_ray_actors_like_the_in_process_reference(tmp_path, ray_env, capsys):
    rng = np.random.default_rng(3)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 10)))) for _ in range(90)]
    queries = [" ".join(rng.choice(WORDS, size=3)) for _ in range(6)]
    corpus = {f"d{i:02d}": {"text": t, "lang": "en"} for i, t in enumerate(docs)}
    qrels = {f"q{i}": {f"d{(7 * i) % 90:02d}": 1, f"d{(7 * i + 1) % 90:02d}": 1} for i in range(6)}
    Collection(corpus, {f"q{i}": {"text": q} for i, q in enumerate(queries)}, qrels).write_beir(
        tmp_path / "coll", "train"
    )
    model = write_tiny_encoder(tmp_path / "model", docs + queries)

    rc = main(
        [
            "data",
            "mine",
            "--out",
            str(tmp_path / "ray"),
            "--collection",
            str(tmp_path / "coll"),
            "--model",
            str(model),
            "--rank-min",
            "2",
            "--rank-max",
            "40",
            "--margin",
            "none",
            "--num-negatives",
            "6",
            "--seed",
            "5",
            "eval.num_workers=2",
            "eval.shard_size=30",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("\n{") + 1 :] if not out.startswith("{") else out)
    emb = json.loads((tmp_path / "ray" / "embeddings" / "manifest.json").read_text())
    assert emb["complete"] and len(emb["shards"]) == 3  # encoded by the Ray pool, 3 shards of 30

    from lancer_dist.config import load_config

    spec = EncoderSpec.from_model_config(str(model), load_config(None, []).model)
    opts = MineOptions(rank_min=2, rank_max=40, margin=None, num_negatives=6, seed=5, shard_size=30)
    ref = mine_hard_negatives(spec, tmp_path / "coll", tmp_path / "local", opts)
    got, want = _groups(tmp_path / "ray"), _groups(tmp_path / "local")
    assert printed["written"] == ref.counts["written"] == len(got) > 0
    assert {q: [n["docid"] for n in g["negatives"]] for q, g in got.items()} == {
        q: [n["docid"] for n in g["negatives"]] for q, g in want.items()
    }
    for q, g in got.items():
        pos = {d for d, r in qrels[q].items() if r > 0}
        assert not pos & {n["docid"] for n in g["negatives"]}
        assert {p["docid"] for p in g["positives"]} == pos
