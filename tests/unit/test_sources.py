"""Source readers and `lancer data passages | groups | inspect`: JSONL / Parquet / TSV / Hugging Face (saved to
disk, the hub code path) inputs, filters with exact counts, bad records."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from lancer_dist.cli import main
from lancer_dist.data.errors import DataError
from lancer_dist.data.shards import load_shard, read_manifest, verify_shards
from lancer_dist.data.sources import GroupOptions, PassageOptions, write_group_shards, write_passage_shards

ROWS = [
    {"id": "a", "text": "hello world", "lang": "en"},
    {"id": "b", "text": "  hello world ", "lang": "en"},  # duplicate after stripping
    {"id": "c", "text": "bonjour le monde", "lang": "fr"},
    {"id": "d", "text": "hi", "lang": "en"},  # too short (min 3)
    {"id": "e", "text": "x" * 50, "lang": "en"},  # too long (max 40)
    {"id": "f", "text": "   ", "lang": "fr"},  # empty
    {"id": "g", "text": "hallo welt", "lang": "de"},  # other language
    {"id": "h", "text": "second english text", "lang": "en"},
    {"id": "i", "text": "third english text", "lang": "en"},  # capped (2 per language)
    {"id": "j", "text": "au revoir", "lang": "fr"},
]
OPTS = {
    "min_chars": 3,
    "max_chars": 40,
    "max_per_language": 2,
    "languages": ["en", "fr"],
    "max_records_per_shard": 1,
}
EXPECTED = {
    "written": {"en": 2, "fr": 2},
    "filtered": {"duplicate": 1, "too_short": 1, "too_long": 1, "empty": 1, "other_language": 1, "capped": 1},
    "bad": {},
}


def _written(root: Path) -> dict[str, list[str]]:
    m = read_manifest(root)
    out: dict[str, list[str]] = {}
    for s in m.shards:
        for _, rec in load_shard(m, s):
            out.setdefault(rec["lang"], []).append(rec["text"])
    return out


def test_jsonl_filters_with_exact_counts(tmp_path: Path) -> None:
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    m, counts = write_passage_shards([f"jsonl:{f}"], tmp_path / "out", PassageOptions(**OPTS))
    assert counts == EXPECTED
    assert m.source["counts"] == EXPECTED and m.source["inputs"] == [f"jsonl:{f}"]
    assert _written(tmp_path / "out") == {
        "en": ["hello world", "second english text"],
        "fr": ["bonjour le monde", "au revoir"],
    }
    assert len(m.shards) == 4 and verify_shards(m)["records"] == 4


def test_parquet_and_tsv_inputs(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "in.parquet")
    _, counts = write_passage_shards(
        [f"parquet:{tmp_path / 'in.parquet'}"], tmp_path / "pq", PassageOptions(**OPTS)
    )
    assert counts == EXPECTED
    tsv = tmp_path / "in.tsv"
    tsv.write_text("id\ttext\n" + "".join(f"{r['id']}\t{r['text']}\n" for r in ROWS if r["lang"] == "fr"))
    m, counts = write_passage_shards([f"tsv:{tsv}"], tmp_path / "tsv", PassageOptions(lang="fr"))
    assert counts["written"] == {"fr": 2} and counts["filtered"] == {"empty": 1}
    assert m.totals == {"fr": 2}


def test_huggingface_saved_per_language_and_single_folder(tmp_path: Path) -> None:
    """The hub path through load_from_disk: mC4-style per-language configs (<dir>/<lang>) and one folder with a
    language column inside a DatasetDict."""
    import datasets

    for lang in ("en", "fr", "de"):
        rows = [r for r in ROWS if r["lang"] == lang]
        datasets.Dataset.from_dict(
            {"text": [r["text"] for r in rows], "url": [r["id"] for r in rows]}
        ).save_to_disk(str(tmp_path / "mc4" / lang))
    _m, counts = write_passage_shards([f"hf:{tmp_path / 'mc4'}"], tmp_path / "o1", PassageOptions(**OPTS))
    # per-language configs never load 'de'; the cap stops streaming 'en' at its 3rd passing record ("i")
    assert counts["written"] == EXPECTED["written"]
    assert counts["filtered"] == {k: v for k, v in EXPECTED["filtered"].items() if k != "other_language"}
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    )
    dd.save_to_disk(str(tmp_path / "single"))
    _, counts = write_passage_shards([f"hf:{tmp_path / 'single'}"], tmp_path / "o2", PassageOptions(**OPTS))
    assert counts == EXPECTED
    with pytest.raises(DataError, match="no split 'dev'"):
        write_passage_shards([f"hf:{tmp_path / 'single'}"], tmp_path / "o3", PassageOptions(split="dev"))


def test_bad_rows_error_or_counted(tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text('{"text": "ok text", "lang": "en"}\n{"lang": "en"}\n{"text": "no language"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: record 'line 2' field 'text'"):
        write_passage_shards([f"jsonl:{f}"], tmp_path / "o", PassageOptions())
    assert not (tmp_path / "o" / "manifest.json").exists()  # aborted: nothing half-written
    f.write_text('{"text": "ok text", "lang": "en"}\n{"lang": "en"}\n{"text": "no language"}\n')
    _, counts = write_passage_shards(
        [f"jsonl:{f}"], tmp_path / "o", PassageOptions(skip_bad=True), overwrite=True
    )
    assert counts == {"written": {"en": 1}, "filtered": {}, "bad": {"missing_text": 1, "missing_lang": 1}}
    f.write_text('{"text": "ok", "lang": "en"}\nnot json\n')
    with pytest.raises(DataError, match=r"line 2.*<json>"):
        write_passage_shards([f"jsonl:{f}"], tmp_path / "o", PassageOptions(), overwrite=True)
    # a line that is not JSON is one bad record: counted with --skip-bad, the rest is read
    _, counts = write_passage_shards(
        [f"jsonl:{f}"], tmp_path / "o", PassageOptions(skip_bad=True), overwrite=True
    )
    assert counts == {"written": {"en": 1}, "filtered": {}, "bad": {"bad_json": 1}}


def _tevatron(i: int, n_neg: int) -> dict:
    return {
        "query_id": str(i),
        "query": f"query {i}",
        "positive_passages": [{"docid": f"p{i}", "title": "t", "text": f"positive {i}"}],
        "negative_passages": [
            {"docid": f"n{i}-{j}", "title": "", "text": f"negative {i} {j}"} for j in range(n_neg)
        ],
    }


def test_groups_from_jsonl_and_saved_dataset(tmp_path: Path) -> None:
    import datasets

    rows = [_tevatron(i, i % 5) for i in range(10)]
    f = tmp_path / "train.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = GroupOptions(min_negatives=2, max_negatives=3, max_records_per_shard=4)
    m, counts = write_group_shards([f"jsonl:{f}"], tmp_path / "g1", opts)
    kept = [r for r in rows if len(r["negative_passages"]) >= 2]
    assert counts == {"written": len(kept), "filtered": {"too_few_negatives": 10 - len(kept)}, "bad": {}}
    recs = [rec for s in m.shards for _, rec in load_shard(m, s)]
    assert [r["query_id"] for r in recs] == [r["query_id"] for r in kept]
    assert all(2 <= len(r["negatives"]) <= 3 for r in recs)
    assert recs[0]["positives"] == [{"docid": "p2", "title": "t", "text": "positive 2"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    m2, counts2 = write_group_shards([f"hf:{tmp_path / 'hf'}"], tmp_path / "g2", opts)
    assert counts2 == counts and [s.sha256 for s in m2.shards] == [s.sha256 for s in m.shards]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**rows[0], "positive_passages": []}) + "\n")
    with pytest.raises(DataError, match=r"record 'line 1' field 'positive_passages': empty list"):
        write_group_shards([f"jsonl:{bad}"], tmp_path / "g3", GroupOptions())


def test_cli_passages_groups_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "in.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    out = tmp_path / "p"
    rc = main(["data", "passages", str(out), "-i", f"jsonl:{f}", "--languages", "en,fr", "--min-chars", "3",
               "--max-chars", "40", "--max-per-language", "2"])  # fmt: skip
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["written"] == EXPECTED["written"] and printed["filtered"] == EXPECTED["filtered"]
    assert main(["data", "inspect", str(out), "--verify"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verified"] == {"shards": 2, "records": 4} and info["totals"] == {"en": 2, "fr": 2}
    # an existing directory is refused without --overwrite; bad input is an error message, exit code 1
    assert main(["data", "passages", str(out), "-i", f"jsonl:{f}"]) == 1
    assert "already holds" in capsys.readouterr().err
    g = tmp_path / "g.jsonl"
    g.write_text("".join(json.dumps(_tevatron(i, 3)) + "\n" for i in range(3)))
    assert main(["data", "groups", str(tmp_path / "g"), "-i", f"jsonl:{g}"]) == 0
    assert Counter(json.loads(capsys.readouterr().out)) and read_manifest(tmp_path / "g").num_records == 3
    (tmp_path / "g" / "shard-000000.tar").write_bytes(b"broken")
    assert main(["data", "inspect", str(tmp_path / "g"), "--verify"]) == 1
    assert "shard-000000.tar" in capsys.readouterr().err
