"""The Bible data: book split, shards, groups, evaluation collections, determinism, empty verses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from lancer_dist.data.shards import load_shard, read_manifest
from lancer_dist.offline.bible import (
    ALL_LANGUAGES,
    BibleDB,
    BibleOptions,
    build_bible_data,
    is_empty_verse,
    parse_verse_id,
)
from lancer_dist.retrieval.collections import read_beir


def _records(d: Path) -> list[tuple[str, dict]]:
    m = read_manifest(d)
    return [kv for s in m.shards for kv in load_shard(m, s)]


@pytest.fixture(scope="module")
def db() -> BibleDB:
    return BibleDB()


@pytest.fixture(scope="module")
def rel(db: BibleDB) -> dict:
    return db.cross_refs()


def _verse_of_doc(doc_id: str) -> tuple[int, int, int]:
    return parse_verse_id(doc_id.split("-")[0])


def test_passage_shards(bible_data: Path) -> None:
    summary = json.loads((bible_data / "summary.json").read_text())
    er = read_manifest(bible_data / "erasure")
    pr = read_manifest(bible_data / "probe")
    assert er.kind == pr.kind == "passages"
    assert sorted(er.totals) == sorted(ALL_LANGUAGES) and len(er.totals) == 22
    assert set(er.totals.values()) == {summary["options"]["passages_per_language"]}
    assert set(pr.totals.values()) == {summary["options"]["probe_per_language"]}
    erasure = _records(bible_data / "erasure")
    probe = _records(bible_data / "probe")
    for _key, rec in erasure + probe:
        assert rec["text"].strip() and not is_empty_verse(rec["text"])
        assert rec["id"] == f"{rec['lang']}-{rec['doc']}"
    # the probe is one verse set, parallel in every language, disjoint from every erasure verse
    probe_verses = {rec["doc"] for _k, rec in probe}
    assert len(probe_verses) == summary["options"]["probe_per_language"]
    assert not probe_verses & {rec["doc"] for _k, rec in erasure}
    # erasure verses are sampled independently per language (not translations of one another)
    by_lang = defaultdict(set)
    for _k, rec in erasure:
        by_lang[rec["lang"]].add(rec["doc"])
    assert by_lang["en"] != by_lang["fr"]


def test_no_evaluation_book_is_seen_in_training(bible_data: Path) -> None:
    splits = json.loads((bible_data / "splits.json").read_text())
    eval_books = {int(b) for b in splits["eval_books"]}
    assert eval_books == {40, 41, 42, 43} and not eval_books & {int(b) for b in splits["train_books"]}
    train_verses = []
    for part in ("erasure", "probe"):
        train_verses += [rec["doc"] for _k, rec in _records(bible_data / part)]
    for _k, g in _records(bible_data / "retrieval"):
        train_verses += [g["query_id"]] + [p["docid"] for p in g["positives"] + g["negatives"]]
    assert len(train_verses) > 1000
    assert not {parse_verse_id(v)[0] for v in train_verses} & eval_books
    for name in ("multilingual_full", "multilingual_sampled", "crosslingual", "monolingual/en"):
        c = read_beir(bible_data / "eval" / name)
        assert {_verse_of_doc(d)[0] for d in list(c.corpus) + list(c.queries)} <= eval_books


def test_retrieval_groups_follow_cross_references(bible_data: Path, db: BibleDB, rel: dict) -> None:
    en = db.verses("4")
    groups = _records(bible_data / "retrieval")
    assert len(groups) == 200
    for _k, g in groups:
        q = parse_verse_id(g["query_id"])
        assert g["lang"] == "en" and g["query"] == en[q]
        pos = [parse_verse_id(p["docid"]) for p in g["positives"]]
        negs = [parse_verse_id(n["docid"]) for n in g["negatives"]]
        assert pos and all(p in rel[q] for p in pos)
        assert len(negs) == 3 and len(set(negs)) == 3
        # hard negatives: not cross-referenced with the query, not the query, from a positive's (or its own) chapter
        assert not set(negs) & (rel[q] | {q})
        chapters = {p[:2] for p in pos} | {q[:2]}
        assert all(n[:2] in chapters for n in negs)
        assert all(p["text"] == en[parse_verse_id(p["docid"])] for p in g["positives"] + g["negatives"])


def test_evaluation_collections(bible_data: Path, db: BibleDB, rel: dict) -> None:
    summary = json.loads((bible_data / "summary.json").read_text())
    langs = summary["eval"]["languages"]
    assert len(langs) == 11 and "en" in langs
    full = read_beir(bible_data / "eval" / "multilingual_full")
    n_q = summary["eval"]["query_verses"]
    assert n_q == 24 and len(full.queries) == n_q * 11
    query_verses = {_verse_of_doc(q) for q in full.queries}
    pool_verses = {_verse_of_doc(d) for d in full.corpus}
    assert not query_verses & pool_verses  # a query's own translations are never candidates
    texts = {lang: db.verses(summary["versions"][lang]["code"]) for lang in langs}
    for qid, q in full.queries.items():
        v = _verse_of_doc(qid)
        assert q["text"] == texts[q["lang"]][v]
        rel_docs = full.qrels[qid]
        rel_verses = {_verse_of_doc(d) for d in rel_docs}
        assert rel_verses and rel_verses <= rel[v]  # relevance = cross-referenced verses ...
        assert len(rel_docs) == len(rel_verses) * 11  # ... in every language
        assert set(rel_verses) == {u for u in rel[v] if u in pool_verses}
    for did, d in full.corpus.items():
        assert d["text"] == texts[d["lang"]][_verse_of_doc(did)]

    sampled = read_beir(bible_data / "eval" / "multilingual_sampled")
    assert len(sampled.queries) == n_q and len(sampled.corpus) == len(pool_verses)
    assert len({q["lang"] for q in sampled.queries.values()}) > 3  # one seeded language per query
    for qid, docs in sampled.qrels.items():
        assert {_verse_of_doc(d) for d in docs} == {_verse_of_doc(d) for d in full.qrels[f"{qid[:8]}-en"]}

    xl = read_beir(bible_data / "eval" / "crosslingual")
    assert {d["lang"] for d in xl.corpus.values()} == {"en"}
    assert {q["lang"] for q in xl.queries.values()} == set(langs) - {"en"}
    assert all(d.endswith("-en") for docs in xl.qrels.values() for d in docs)

    for lang in langs:
        mono = read_beir(bible_data / "eval" / "monolingual" / lang)
        assert (
            {d["lang"] for d in mono.corpus.values()} == {q["lang"] for q in mono.queries.values()} == {lang}
        )
        assert len(mono.qrels) == n_q


def test_empty_verses_are_skipped_and_counted(bible_data: Path) -> None:
    summary = json.loads((bible_data / "summary.json").read_text())
    skipped = summary["empty_verses_skipped"]
    assert skipped["bn"] >= 700 and skipped["tr"] >= 800  # "-" and "(aynı)" placeholders
    assert skipped["en"] == 0
    assert is_empty_verse(" - ") and is_empty_verse("(aynı)") and not is_empty_verse("Jesus wept.")


def _small(seed: int = 0) -> BibleOptions:
    return BibleOptions(
        seed=seed,
        languages=["en", "fr", "zh"],
        eval_languages=["en", "fr", "zh"],
        passages_per_language=12,
        probe_per_language=4,
        eval_queries=6,
        eval_distractors=10,
        negatives=2,
        max_groups=20,
        max_records_per_shard=10,
    )


def _tree(d: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(d.rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name in ("manifest.json", "summary.json"):  # drop creation times and durations
                obj = json.loads(data)
                obj.pop("created", None)
                obj.pop("seconds", None)
                data = json.dumps(obj, sort_keys=True).encode()
            out[str(p.relative_to(d))] = data
    return out


def test_deterministic_and_seeded(tmp_path: Path, db: BibleDB) -> None:
    build_bible_data(tmp_path / "a", _small(0), db)
    # the same options through the command line
    from lancer_dist.cli import main

    rc = main(
        [
            "data",
            "bible",
            "--out",
            str(tmp_path / "b"),
            "--languages",
            "en",
            "fr",
            "zh",
            "--eval-languages",
            "en",
            "fr",
            "zh",
            "--passages-per-language",
            "12",
            "--probe-per-language",
            "4",
            "--eval-queries",
            "6",
            "--eval-distractors",
            "10",
            "--negatives",
            "2",
            "--max-groups",
            "20",
            "--max-records-per-shard",
            "10",
        ]
    )
    assert rc == 0
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a.keys() == b.keys() and a == b
    build_bible_data(tmp_path / "c", _small(1), db)
    c = _tree(tmp_path / "c")
    assert c["eval/multilingual_full/queries.jsonl"] != a["eval/multilingual_full/queries.jsonl"]


def test_bad_options_name_the_option() -> None:
    with pytest.raises(ValueError, match=r"languages.*'xx'"):
        BibleOptions(languages=["en", "xx"]).validate()
    with pytest.raises(ValueError, match="eval_books"):
        BibleOptions(eval_books=[0]).validate()
    with pytest.raises(ValueError, match=r"eval_languages.*'en'"):
        BibleOptions(eval_languages=["fr", "de"]).validate()


def test_parallel_builders_build_once(tmp_path: Path) -> None:
    """Two processes asking for the same data: one builds (in a temp dir, renamed into place), the other waits."""
    out = tmp_path / "bible"
    code = (
        "import sys, json; from lancer_dist.offline import ensure_bible_data; "
        "p = ensure_bible_data(sys.argv[1], languages=['en', 'de'], eval_languages=['en', 'de'], "
        "passages_per_language=5, probe_per_language=2, eval_queries=3, eval_distractors=3, max_groups=5); "
        "print(json.load(open(p / 'summary.json'))['seconds'])"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0].decode().strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1]  # the same build's summary, not two builds
    assert sorted(x.name for x in tmp_path.iterdir()) == [".bible.lock", "bible"]
    assert (out / "summary.json").is_file() and (
        out / "eval" / "crosslingual" / "qrels" / "test.tsv"
    ).is_file()
