"""``lancer data mine``: hard negatives from a rank window, checked against an independent numpy ranking.

A tiny random-init encoder and a 160-passage collection. The qrels are chosen from the reference ranking itself so
that positives fall inside the window (they must be removed) and the margin removes some candidates but not all.
The reference below ranks with numpy (float64 inner products of the encoder's embeddings, ties by corpus position)
and applies the window and both exclusions itself; the mined groups must hold exactly its negatives, in rank order.
"""

from __future__ import annotations

import numpy as np
import pytest

from lancer_dist.config import ModelConfig
from lancer_dist.data.shards import check_group, load_shard, read_manifest, verify_shards
from lancer_dist.retrieval.collections import Collection
from lancer_dist.retrieval.encoder_io import EncoderSpec, load_encoder
from lancer_dist.retrieval.mine import MineOptions, mine_hard_negatives
from lancer_dist.retrieval.tiny import write_tiny_encoder
from tests.tiny_models import GREEK

WORDS = GREEK
N_DOCS, N_QUERIES = 160, 8


def _texts(n: int, seed: int, lo: int, hi: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi)))) for _ in range(n)]


@pytest.fixture(scope="module")
def coll(tmp_path_factory):
    root = tmp_path_factory.mktemp("mine")
    docs = _texts(N_DOCS, 0, 3, 12)
    queries = _texts(N_QUERIES, 1, 2, 5)
    ids = [f"d{i:03d}" for i in range(N_DOCS)]
    model = write_tiny_encoder(root / "model", docs + queries)
    spec = EncoderSpec(
        str(model), ModelConfig(query_prefix="query: ", passage_prefix="passage: ", max_passage_length=32)
    )
    enc = load_encoder(spec, "cpu")
    p_ND = enc.encode(docs, is_query=False).astype(np.float64)
    q_QD = enc.encode(queries, is_query=True).astype(np.float64)
    scores_QN = q_QD @ p_ND.T
    # Positives at reference ranks 2 and 12 (+ for odd queries one far down): inside the windows tested below.
    qrels: dict[str, dict[str, int]] = {}
    for qi in range(N_QUERIES):
        order = np.lexsort((np.arange(N_DOCS), -scores_QN[qi]))
        picks = [order[1], order[11]] + ([order[120]] if qi % 2 else [])
        qrels[f"q{qi}"] = {ids[j]: 1 for j in picks}
        qrels[f"q{qi}"][ids[order[4]]] = 0  # judged non-relevant: a valid negative
    Collection(
        {ids[i]: {"text": docs[i], "lang": "en"} for i in range(N_DOCS)},
        {f"q{i}": {"text": queries[i], "lang": "en"} for i in range(N_QUERIES)},
        qrels,
    ).write_beir(root / "coll", split="train")
    return {"root": root, "spec": spec, "enc": enc, "ids": ids, "scores": scores_QN, "qrels": qrels}


def reference(coll, qi: int, rank_min: int, rank_max: int, margin: float | None) -> list[str]:
    """Independent: numpy ranking (score desc, corpus position asc), window, minus positives and margin."""
    s = coll["scores"][qi]
    ids = coll["ids"]
    pos = {d for d, r in coll["qrels"][f"q{qi}"].items() if r > 0}
    thr = min(s[ids.index(d)] for d in pos) - margin if margin is not None else np.inf
    order = np.lexsort((np.arange(len(s)), -s))
    return [ids[j] for j in order[rank_min - 1 : rank_max] if ids[j] not in pos and s[j] <= thr]


def _groups(out) -> dict[str, dict]:
    m = read_manifest(out)
    assert m.kind == "groups"
    verify_shards(m)  # checksums and counts of every shard, as `lancer data inspect --verify`
    recs = {}
    for shard in m.shards:
        for key, rec in load_shard(m, shard):
            check_group(str(out), key, rec)
            recs[rec["query_id"]] = rec
    return recs


@pytest.mark.parametrize(
    ("rank_min", "rank_max", "margin"),
    [(1, 20, None), (3, 40, 0.0), (10, 100, 0.002), (5, 30, -0.01)],
)
def test_mined_negatives_are_exactly_the_numpy_window_after_exclusions(
    coll, tmp_path, rank_min, rank_max, margin
):
    opts = MineOptions(
        rank_min=rank_min,
        rank_max=rank_max,
        margin=margin,
        num_negatives=None,
        min_negatives=0,
        split="train",
    )
    out = tmp_path / "groups"
    res = mine_hard_negatives(
        coll["spec"], coll["root"] / "coll", out, opts, emb_dir=tmp_path / "emb", encoder=coll["enc"]
    )
    groups = _groups(out)
    assert sorted(groups) == [f"q{i}" for i in range(N_QUERIES)]
    removed = res.counts["removed_from_window"]
    for qi in range(N_QUERIES):
        g = groups[f"q{qi}"]
        pos = {d for d, r in coll["qrels"][f"q{qi}"].items() if r > 0}
        assert {p["docid"] for p in g["positives"]} == pos
        negs = [n["docid"] for n in g["negatives"]]
        assert not pos & set(negs), "a positive was mined as a negative"
        assert negs == reference(coll, qi, rank_min, rank_max, margin)
        assert [n["rank"] for n in g["negatives"]] == sorted(n["rank"] for n in g["negatives"])
        assert all(rank_min <= n["rank"] <= rank_max for n in g["negatives"])
    # The data exercise what is tested: positives inside the window, and the margin removing some candidates.
    if rank_min <= 12:
        assert removed["positive"] >= N_QUERIES
    if margin is not None:
        assert removed.get("within_margin", 0) > 0
    assert res.counts["negatives"] == sum(len(g["negatives"]) for g in groups.values()) > 0


def test_the_window_bounds_are_inclusive_and_one_based(coll, tmp_path):
    # A window of one rank: exactly the reference's document at that rank (rank 12 is a positive: nothing).
    for rank, expect_empty in ((1, False), (12, True)):
        opts = MineOptions(rank_min=rank, rank_max=rank, margin=None, num_negatives=None, min_negatives=0)
        out = tmp_path / f"r{rank}"
        mine_hard_negatives(
            coll["spec"], coll["root"] / "coll", out, opts, emb_dir=tmp_path / "emb", encoder=coll["enc"]
        )
        groups = _groups(out)
        for qi in range(N_QUERIES):
            order = np.lexsort((np.arange(N_DOCS), -coll["scores"][qi]))
            got = [n["docid"] for n in groups[f"q{qi}"]["negatives"]]
            assert got == ([] if expect_empty else [coll["ids"][order[rank - 1]]])


def test_sampling_is_seeded_and_draws_from_the_eligible_window(coll, tmp_path):
    def mine(seed: int, name: str) -> dict[str, list[str]]:
        opts = MineOptions(rank_min=3, rank_max=60, margin=None, num_negatives=5, seed=seed)
        mine_hard_negatives(
            coll["spec"],
            coll["root"] / "coll",
            tmp_path / name,
            opts,
            emb_dir=tmp_path / "emb",
            encoder=coll["enc"],
        )
        return {q: [n["docid"] for n in g["negatives"]] for q, g in _groups(tmp_path / name).items()}

    a, a2, b = mine(7, "a"), mine(7, "a2"), mine(8, "b")
    assert a == a2
    assert a != b
    for qi in range(N_QUERIES):
        window = reference(coll, qi, 3, 60, None)
        q = f"q{qi}"
        assert len(a[q]) == 5 and set(a[q]) <= set(window)
        assert a[q] == [d for d in window if d in a[q]]  # kept in rank order
    # Not the head of the window: over 8 queries a uniform sample of 5 of ~55 is never always the first 5.
    assert any(a[f"q{qi}"] != reference(coll, qi, 3, 60, None)[:5] for qi in range(N_QUERIES))


def test_queries_with_too_few_negatives_are_counted_not_written(coll, tmp_path):
    opts = MineOptions(rank_min=12, rank_max=12, margin=None, num_negatives=None, min_negatives=1)
    res = mine_hard_negatives(
        coll["spec"],
        coll["root"] / "coll",
        tmp_path / "g",
        opts,
        emb_dir=tmp_path / "emb",
        encoder=coll["enc"],
    )
    assert res.counts["written"] == 0
    assert res.counts["skipped"]["too_few_negatives"] == N_QUERIES


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="rank_min <= rank_max"):
        MineOptions(rank_min=10, rank_max=5)
    with pytest.raises(ValueError, match="num_negatives"):
        MineOptions(num_negatives=0)


def test_cli_without_ray_writes_the_reference_groups(coll, tmp_path, capsys):
    from lancer_dist.cli import main

    # The CLI builds its EncoderSpec from the config (no prefixes by default): the reference is mined likewise.
    spec = EncoderSpec(str(coll["spec"].path), ModelConfig())
    args = [
        "--rank-min",
        "3",
        "--rank-max",
        "25",
        "--margin",
        "0.0",
        "--num-negatives",
        "0",
        "--min-negatives",
        "0",
    ]
    base = ["data", "mine", "--out", str(tmp_path / "cli"), "--collection", str(coll["root"] / "coll")]
    rc = main([*base, "--model", str(coll["spec"].path), "--split", "train", "--no-ray", *args])
    assert rc == 0, capsys.readouterr().err
    opts = MineOptions(rank_min=3, rank_max=25, margin=0.0, num_negatives=None, min_negatives=0)
    ref = mine_hard_negatives(spec, coll["root"] / "coll", tmp_path / "lib", opts)
    got, want = _groups(tmp_path / "cli"), _groups(tmp_path / "lib")
    assert got == want and ref.counts["negatives"] > 0
    # refuses to overwrite without --overwrite, before encoding anything
    assert (
        main(
            [
                "data",
                "mine",
                "--out",
                str(tmp_path / "cli"),
                "--collection",
                str(coll["root"] / "coll"),
                "--model",
                str(coll["spec"].path),
                "--no-ray",
            ]
        )
        == 1
    )
    assert "already holds manifest.json" in capsys.readouterr().err
