"""Training streams: exact language balance, whole groups, sub-stream partitions, exact resume (2 ranks, 2 workers).

The data are written by the tests with the real ShardWriter; the tokenizer is a real ``tokenizers`` WordLevel model
trained on the test's texts, wrapped in ``PreTrainedTokenizerFast`` (no download)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from lancer_dist.config import ConfigError, RunConfig, load_config
from lancer_dist.data.errors import SkipCounter
from lancer_dist.data.shards import ShardWriter, read_manifest
from lancer_dist.data.stream import (
    _BATCH_TENSORS,
    StreamPlan,
    SubStream,
    TrainBatch,
    TrainStream,
    check_world_size,
    erasure_layout,
)

LANGS = {
    "en": 13,
    "fr": 7,
    "de": 21,
    "zh": 10,
}  # records per language; different sizes roll epochs at different steps
WORDS = [f"w{i}" for i in range(40)]


def make_tokenizer(words: list[str] = WORDS) -> Any:
    from lancer_dist.retrieval.tiny import word_tokenizer

    return word_tokenizer(
        ["query:", "passage:", *LANGS, *words], specials=["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    )


def _text(rng: random.Random, lang: str) -> str:
    return " ".join([lang, *rng.choices(WORDS, k=rng.randint(1, 12))])


def write_passages(
    root: Path, per_shard: int = 4, langs: dict[str, int] = LANGS, seed: int = 0, mixed: bool = False
) -> Path:
    """Per-language shards, or (``mixed``) shards filled in order, several holding two languages."""
    rng = random.Random(seed)
    with ShardWriter(root, "passages", max_records_per_shard=per_shard, group_by_language=not mixed) as w:
        for lang, n in langs.items():
            for i in range(n):
                w.write(f"{lang}-{i:03d}", {"text": _text(rng, lang), "lang": lang})
    return root


def group_record(i: int, n_neg: int, rng: random.Random) -> dict[str, Any]:
    return {
        "query_id": str(i),
        "query": " ".join(rng.choices(WORDS, k=4)),
        "positives": [{"docid": f"p{i}-{j}", "title": "", "text": _text(rng, "en")} for j in range(2)],
        "negatives": [{"docid": f"n{i}-{j}", "title": "w1", "text": _text(rng, "en")} for j in range(n_neg)],
    }


def write_groups(root: Path, n: int = 30, n_neg: int = 5, per_shard: int = 6, seed: int = 1) -> Path:
    rng = random.Random(seed)
    with ShardWriter(root, "groups", max_records_per_shard=per_shard) as w:
        for i in range(n):
            w.write(f"q{i:03d}", group_record(i, n_neg, rng))
    return root


def make_cfg(tmp: Path, **over: Any) -> RunConfig:
    erasure = tmp / "erasure"
    retrieval = tmp / "retrieval"
    if not erasure.exists():
        write_passages(erasure)
    if not retrieval.exists():
        write_groups(retrieval)
    items = {
        "model.backbone_config": {"model_type": "bert"},
        "model.tokenizer": "unused",
        "model.query_prefix": "query: ",
        "model.passage_prefix": "passage: ",
        "model.max_query_length": 6,
        "model.max_passage_length": 10,
        "data.erasure.path": str(erasure),
        "data.erasure.passages_per_language": 2,
        "data.retrieval.path": str(retrieval),
        "data.retrieval.queries_per_step": 4,
        "data.retrieval.group_size": 3,
        "data.shuffle_buffer": 5,
        "data.num_workers": 0,
        "train.steps": 12,
        "train.warmup_steps": 0,
        **over,
    }
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in items.items()])


def run_all(cfg: RunConfig, tok: Any, world: int, **kw: Any) -> list[list[TrainBatch]]:
    """All batches of every (simulated) rank: result[rank][i]."""
    return [list(TrainStream.from_config(cfg, tok, rank=r, world_size=world, **kw)) for r in range(world)]


def erasure_plan(m: Any, skip: bool) -> StreamPlan:
    """A one-process plan over the erasure shards of manifest ``m`` alone (one passage per language and step)."""
    return StreamPlan(
        rank=0,
        world_size=1,
        num_roles=1,
        seed=0,
        shuffle_buffer=0,
        skip_bad=skip,
        group_size=1,
        queries_per_step=0,
        per_language=1,
        languages=sorted(m.totals),
        erasure=m,
        retrieval=None,
        collator=None,
    )


def same_batch(a: TrainBatch, b: TrainBatch) -> bool:
    return (
        a.step == b.step
        and a.query_keys == b.query_keys
        and a.passage_docids == b.passage_docids
        and a.erasure_keys == b.erasure_keys
        and all(torch.equal(getattr(a, f), getattr(b, f)) for f in _BATCH_TENSORS)
    )


@pytest.fixture(scope="module")
def tok() -> Any:
    return make_tokenizer()


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 4, 16])
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_erasure_layout_is_exact(n: int, m: int, world: int) -> None:
    if (n * m) % world:
        with pytest.raises(ConfigError, match="passages_per_language"):
            erasure_layout(n, m, world, 0)
        return
    parts = [erasure_layout(n, m, world, r) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # equal shares
    assert Counter(x for p in parts for x in p) == dict.fromkeys(range(n), m)


@pytest.mark.parametrize(("workers", "mixed"), [(0, False), (2, False), (0, True)])
def test_every_step_is_exactly_balanced_and_groups_are_whole(
    tmp_path: Path, tok: Any, workers: int, mixed: bool
) -> None:
    if mixed:
        write_passages(tmp_path / "erasure", per_shard=5, mixed=True)
        assert any(len(s.languages) > 1 for s in read_manifest(tmp_path / "erasure").shards)
    cfg = make_cfg(tmp_path, **{"data.num_workers": workers})
    ranks = run_all(cfg, tok, world=2)
    truth = {}  # key -> (lang, text), read independently of the stream
    for s in read_manifest(tmp_path / "erasure").shards:
        import tarfile

        with tarfile.open(tmp_path / "erasure" / s.name) as tf:
            for mem in tf.getmembers():
                f = tf.extractfile(mem)
                assert f is not None
                rec = json.loads(f.read())
                truth[mem.name.split(".")[0]] = (rec["lang"], rec["text"])
    langs = TrainStream.from_config(cfg, tok, rank=0, world_size=2).languages
    assert langs == sorted(LANGS)
    for step in range(12):
        batches = [ranks[r][step] for r in range(2)]
        assert all(b.step == step for b in batches)
        # exactly m=2 passages of each language over the two ranks, each rank an equal share (4)
        keys = [k for b in batches for k in b.erasure_keys]
        assert Counter(truth[k][0] for k in keys) == dict.fromkeys(LANGS, 2)
        for b in batches:
            assert b.erasure_input_ids.shape[0] == 4 == b.erasure_languages.shape[0]
            assert [langs[i] for i in b.erasure_languages.tolist()] == [truth[k][0] for k in b.erasure_keys]
            # tokenisation of row i is the tokenizer's own encoding of "passage: " + that record's text
            for i, k in enumerate(b.erasure_keys):
                ids = tok("passage: " + truth[k][1], truncation=True, max_length=10)["input_ids"]
                row, mask = b.erasure_input_ids[i], b.erasure_attention_mask[i]
                assert row[: len(ids)].tolist() == ids and mask.sum().item() == len(ids)
                assert (row[len(ids) :] == tok.pad_token_id).all()
            assert (
                b.erasure_attention_mask.sum(1).max() == b.erasure_input_ids.shape[1]
            )  # padded to the longest
            # retrieval: 2 queries per rank, groups of 3, positive first
            assert b.query_input_ids.shape[0] == 2 and b.passage_input_ids.shape[0] == 6
            assert b.query_input_ids.shape[1] <= 6 and b.passage_input_ids.shape[1] <= 10
            for g, q in enumerate(b.query_keys):
                ids = b.passage_docids[3 * g : 3 * g + 3]
                n = q[1:].lstrip("0") or "0"
                assert ids[0].startswith(f"p{n}-") and all(x.startswith(f"n{n}-") for x in ids[1:])
                assert len(set(ids)) == 3
                # every stored positive's docid travels with the query (false-negative masking)
                assert b.query_positive_docids[g] == [f"p{n}-0", f"p{n}-1"]
            assert len(b.query_positive_docids) == len(b.query_keys)
        # queries of one step are distinct across ranks (disjoint partitions)
        qs = [k for b in batches for k in b.query_keys]
        assert len(set(qs)) == len(qs)


def _substreams(
    tmp: Path, lang: str | None, S: int, skip: bool, group_size: int = 1, buffer: int = 3
) -> list:
    cfg = make_cfg(tmp)
    m = read_manifest(tmp / ("erasure" if lang else "retrieval"))
    if lang is None:
        from lancer_dist.data.stream import _SubSpec

        spec = _SubSpec("retrieval", m, tuple(m.shards), None)
    else:
        spec = erasure_plan(m, skip).erasure_spec(lang)
    del cfg
    return [
        SubStream(
            spec,
            i,
            S,
            seed=7,
            shuffle_buffer=buffer,
            skip_bad=skip,
            counter=SkipCounter(),
            group_size=group_size,
        )
        for i in range(S)
    ]


@pytest.mark.parametrize(("lang", "S"), [("de", 4), ("fr", 4), ("en", 3), (None, 4), (None, 7)])
def test_slots_partition_each_epoch_exactly(tmp_path: Path, lang: str | None, S: int) -> None:
    """Per epoch, the slots' records are disjoint and together are every record once (split by shard when there
    are enough shards, by record stride otherwise); different epochs are reshuffled."""
    subs = _substreams(tmp_path, lang, S, skip=False)
    total = LANGS[lang] if lang else 30
    for epoch in range(2):
        per_slot = [[k for k, _, _ in s._shuffled(epoch)] for s in subs]
        allk = [k for p in per_slot for k in p]
        assert len(allk) == total == len(set(allk))
        if epoch == 0:
            first = per_slot
    assert first != per_slot


def test_substream_rolls_epochs_and_restores(tmp_path: Path) -> None:
    (s,) = _substreams(tmp_path, "fr", 1, skip=False)
    seq = [s.next()[:2] for _ in range(7 * 3)]
    assert Counter(k for k, _ in seq) == {f"fr-{i:03d}": 3 for i in range(7)}  # 3 full epochs
    assert [k for k, _ in seq[:7]] != [k for k, _ in seq[7:14]]  # reshuffled per epoch
    for cut in (0, 5, 7, 13):
        (t,) = _substreams(tmp_path, "fr", 1, skip=False)
        for _ in range(cut):
            t.next()
        st = t.state()
        (u,) = _substreams(tmp_path, "fr", 1, skip=False)
        u.restore(st)
        assert [u.next()[:2] for _ in range(21 - cut)] == seq[cut:]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_after_step_s_yields_the_uninterrupted_batches(tmp_path: Path, tok: Any, workers: int) -> None:
    cfg = make_cfg(tmp_path, **{"data.num_workers": workers})
    full = run_all(cfg, tok, world=2)
    for s in (0, 3, 6):
        for r in range(2):
            st = TrainStream.from_config(cfg, tok, rank=r, world_size=2)
            it = iter(st)
            for _ in range(s + 1):  # consume steps 0..s, then stop (workers have prefetched further)
                next(it)
            del it
            sd = json.loads(json.dumps(st.state_dict()))  # survives a JSON checkpoint
            resumed = TrainStream.from_config(cfg, tok, rank=r, world_size=2, start_step=s + 1)
            resumed.load_state_dict(sd)
            got = list(resumed)
            assert [b.step for b in got] == list(range(s + 1, 12))
            assert all(same_batch(a, b) for a, b in zip(got, full[r][s + 1 :], strict=True))
    # without a state, start_step replays from step 0 to the same place
    late = list(TrainStream.from_config(cfg, tok, rank=1, world_size=2, start_step=7))
    assert all(same_batch(a, b) for a, b in zip(late, full[1][7:], strict=True))


def test_iterating_again_continues_and_state_checks(tmp_path: Path, tok: Any) -> None:
    cfg = make_cfg(tmp_path, **{"data.num_workers": 2})
    full = run_all(cfg, tok, world=1)[0]
    st = TrainStream.from_config(cfg, tok, rank=0, world_size=1)
    got = []
    for b in st:
        got.append(b)
        if b.step == 4:
            break
    got += list(st)
    assert all(same_batch(a, b) for a, b in zip(got, full, strict=True))
    sd = st.state_dict()
    # settings that define the global batches must agree; the error names the field
    for field, value in [
        ("data.seed", 5),
        ("data.erasure.passages_per_language", 1),
        ("data.shuffle_buffer", 2),
    ]:
        other = TrainStream.from_config(make_cfg(tmp_path, **{field: value}), tok, rank=0, world_size=1)
        with pytest.raises(ValueError, match=re.escape(field)):
            other.load_state_dict(sd)
    with pytest.raises(ValueError, match="format"):
        other.load_state_dict({**sd, "format": 1})


def _unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]


def _global_view(batches: list[TrainBatch]) -> dict[str, Any]:
    """One global step from its per-rank slices, concatenated in rank order (padding removed: each rank pads to
    its own longest row)."""
    cat: dict[str, Any] = {
        "erasure_keys": [],
        "query_keys": [],
        "passage_docids": [],
        "positives": [],
        "langs": [],
    }
    for f in ("query", "passage", "erasure"):
        cat[f] = []
    for b in batches:
        cat["erasure_keys"] += b.erasure_keys
        cat["query_keys"] += b.query_keys
        cat["passage_docids"] += b.passage_docids
        cat["positives"] += b.query_positive_docids
        cat["langs"] += b.erasure_languages.tolist()
        for f in ("query", "passage", "erasure"):
            cat[f] += _unpadded(getattr(b, f + "_input_ids"), getattr(b, f + "_attention_mask"))
    return cat


WORLD_CFG = {
    "data.erasure.passages_per_language": 3,
    "data.retrieval.queries_per_step": 6,
}  # 12 and 6: 1, 2, 3 divide


@pytest.mark.parametrize(("world", "workers"), [(2, 0), (3, 2), (1, 2)])
def test_global_batch_is_independent_of_world_size_and_workers(
    tmp_path: Path, tok: Any, world: int, workers: int
) -> None:
    """Step t over all ranks, for any world size and number of workers, is the one-process step t."""
    ref = run_all(make_cfg(tmp_path, **WORLD_CFG), tok, world=1)[0]
    ranks = run_all(make_cfg(tmp_path, **WORLD_CFG, **{"data.num_workers": workers}), tok, world=world)
    for t in range(12):
        one = _global_view([ref[t]])
        assert _global_view([ranks[r][t] for r in range(world)]) == one
        assert Counter(one["langs"]) == dict.fromkeys(range(4), 3)  # exactly m = 3 per language
        assert len(set(one["query_keys"])) == 6
        assert all(len({len(ranks[r][t].erasure_keys) for r in range(world)}) == 1 for _ in [0])
    # the data are really consumed (epochs roll: 12 steps x 3 'fr' passages > 7 'fr' records)
    fr = [k for b in ref for k in b.erasure_keys if k.startswith("fr")]
    assert set(fr) == {f"fr-{i:03d}" for i in range(7)}


@pytest.mark.parametrize("world", [2, 3])
def test_shard_of_the_global_batch_is_what_each_rank_streams(tmp_path: Path, tok: Any, world: int) -> None:
    """``TrainBatch.shard(r, W)`` of the one-process batch holds exactly rank r's rows of a W-rank stream (keys,
    docids, languages and unpadded token ids; only padding may differ)."""
    ref = run_all(make_cfg(tmp_path, **WORLD_CFG), tok, world=1)[0]
    ranks = run_all(make_cfg(tmp_path, **WORLD_CFG), tok, world=world)
    for t in range(4):
        for r in range(world):
            assert _global_view([ref[t].shard(r, world)]) == _global_view([ranks[r][t]])
    with pytest.raises(ValueError, match="do not split over 4 ranks"):
        ref[0].shard(0, 4)


def test_resume_on_another_world_size_and_workers(tmp_path: Path, tok: Any) -> None:
    """A state saved by rank 0 of 2 ranks x 2 workers after step 4 resumes on 1 rank and on 3 ranks (0 or 2
    workers) to exactly the slices of the uninterrupted run; every rank's state is the same global state."""
    cfg2 = make_cfg(tmp_path, **WORLD_CFG, **{"data.num_workers": 2})
    full = run_all(make_cfg(tmp_path, **WORLD_CFG), tok, world=1)[0]
    states = []
    for r in range(2):
        st = TrainStream.from_config(cfg2, tok, rank=r, world_size=2)
        it = iter(st)
        for _ in range(5):  # steps 0..4
            next(it)
        del it
        states.append(json.loads(json.dumps(st.state_dict())))
    assert states[0]["next_step"] == 5
    assert {k: v for k, v in states[0].items() if k != "written_by"} == {
        k: v for k, v in states[1].items() if k != "written_by"
    }
    for world, workers in [(1, 0), (3, 2), (3, 0)]:
        cfg = make_cfg(tmp_path, **WORLD_CFG, **{"data.num_workers": workers})
        parts = []
        for r in range(world):
            resumed = TrainStream.from_config(cfg, tok, rank=r, world_size=world)
            resumed.load_state_dict(states[0])
            parts.append(list(resumed))
        assert [b.step for b in parts[0]] == list(range(5, 12))
        for i, t in enumerate(range(5, 12)):
            assert _global_view([parts[r][i] for r in range(world)]) == _global_view([full[t]]), (world, t)


def test_config_errors(tmp_path: Path, tok: Any) -> None:
    cfg = make_cfg(
        tmp_path, **{"data.erasure.passages_per_language": 3, "data.retrieval.queries_per_step": 8}
    )
    with pytest.raises(ConfigError, match=r"passages_per_language.*divisible by the world size 8"):
        TrainStream.from_config(cfg, tok, rank=0, world_size=8)
    with pytest.raises(ConfigError, match=r"passages_per_language.*divisible by the world size 8"):
        check_world_size(cfg.data, 8)  # the launch-time check (no stream built)
    check_world_size(cfg.data, 4)
    cfg = make_cfg(tmp_path, **{"data.erasure.languages": ["en", "xx"]})
    with pytest.raises(ConfigError, match=r"data.erasure.languages.*unknown: \['xx'\]"):
        TrainStream.from_config(cfg, tok, rank=0, world_size=1)
    cfg = make_cfg(tmp_path, **{"data.retrieval.queries_per_step": 3})
    with pytest.raises(ConfigError, match="queries_per_step"):
        TrainStream.from_config(cfg, tok, rank=0, world_size=2)
    cfg = make_cfg(tmp_path, **{"data.retrieval.path": str(tmp_path / "erasure")})
    with pytest.raises(ConfigError, match="kind 'groups'"):
        TrainStream.from_config(cfg, tok, rank=0, world_size=1)
    cfg = make_cfg(tmp_path, **{"data.erasure.languages": ["zh", "fr"], "data.retrieval.path": ""})
    st = TrainStream.from_config(cfg, tok, rank=0, world_size=1, num_steps=2)
    (b, _) = list(st)
    assert st.languages == ["zh", "fr"] and b.erasure_languages.tolist() == [0, 1, 0, 1]
    assert b.query_input_ids.shape == (0, 0) and all(k.startswith(("zh", "fr")) for k in b.erasure_keys)


def _reference_encode(tokenizer: Any, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("side", ["right", "left"])
def test_collator_matches_the_tokenizer_call(tok: Any, side: str) -> None:
    from lancer_dist.data.collate import Collator

    tok.padding_side = side
    try:
        rng = random.Random(5)
        texts = [_text(rng, "en") for _ in range(9)]
        c = Collator(
            tok, query_prefix="query: ", passage_prefix="passage: ", max_query_length=5, max_passage_length=9
        )
        for got, ref in [
            (c.queries(texts), _reference_encode(tok, ["query: " + t for t in texts], 5)),
            (c.passages(texts), _reference_encode(tok, ["passage: " + t for t in texts], 9)),
        ]:
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    finally:
        tok.padding_side = "right"


def test_collator_matches_the_e5_tokenizer_if_built() -> None:
    from lancer_dist.data.collate import Collator
    from lancer_dist.paths import cache_dir

    path = cache_dir() / "models" / "multilingual-e5-small"
    if not (path / "tokenizer.json").is_file():
        pytest.skip("the offline e5 tokenizer is not built (lancer data backbone)")
    from transformers import AutoTokenizer

    e5 = AutoTokenizer.from_pretrained(str(path))
    texts = ["In the beginning God created the heaven and the earth.", "Au commencement, Dieu créa les cieux.",
             "太初，神创造天地。", "في البدء خلق الله السماوات والأرض", "В начале сотворил Бог небо и землю." * 8]  # fmt: skip
    c = Collator(e5, passage_prefix="passage: ", max_passage_length=16)
    ref = _reference_encode(e5, ["passage: " + t for t in texts], 16)
    got = c.passages(texts)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_loader_workers_survive_a_preemption_signal(tmp_path: Path, tok: Any) -> None:
    """SLURM's `scancel --signal` reaches every process of a job step, DataLoader workers included: they must not
    die of SIGTERM / SIGUSR1 (the trainer would fail with "DataLoader worker is killed" instead of checkpointing)."""
    import os
    import signal

    import psutil

    cfg = make_cfg(tmp_path, **{"data.num_workers": 2})
    full = run_all(cfg, tok, world=1)[0]
    got = []
    me = psutil.Process()
    # children left by earlier tests in this process (other loaders, servers) are not this stream's workers
    before = {p.pid for p in me.children()}
    for b in TrainStream.from_config(cfg, tok, rank=0, world_size=1):
        got.append(b)
        if b.step == 2:
            workers = [p for p in me.children() if p.pid not in before]
            assert len(workers) == 2, workers
            for w in workers:
                os.kill(w.pid, signal.SIGTERM)
                os.kill(w.pid, signal.SIGUSR1)
    assert all(same_batch(a, b) for a, b in zip(got, full, strict=True)) and len(got) == len(full)
