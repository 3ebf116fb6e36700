"""mC4 from local files in ``allenai/c4``'s multilingual layout (``multilingual/c4-<lang>.tfrecord-XXXXX-of-YYYYY.json.gz``,
gzipped JSON lines ``{"text", "timestamp", "url"}``) to passage shards: per-language streaming, exact-duplicate
removal (counted), head and seeded reservoir sampling, bad files and lines named or counted."""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter

import numpy as np
import pytest

from lancer_dist.cli import main
from lancer_dist.data.errors import DataError
from lancer_dist.data.shards import load_shard, read_manifest, verify_shards
from lancer_dist.data.sources import PassageOptions, Reservoir, c4_files, write_passage_shards


def _write(path, rows) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")


def _row(text: str, i: int) -> dict:
    return {
        "text": text,
        "timestamp": f"2020-01-{1 + i % 28:02d}T00:00:00Z",
        "url": f"https://example.org/{i}",
    }


@pytest.fixture
def c4(tmp_path):
    """en: 2 train files, 30 + 30 rows with 4 exact duplicates (one only after stripping) and 1 empty text;
    fr: 1 file; zh-Latn: 1 file; en validation: 1 file; plus files that are not in the layout (ignored)."""
    d = tmp_path / "c4" / "multilingual"
    d.mkdir(parents=True)
    en0 = [_row(f"english passage number {i}", i) for i in range(30)]
    en1 = [_row(f"english passage number {i}", i) for i in range(30, 60)]
    en1[3] = _row("english passage number 5", 103)  # duplicate of a row of the first file
    en1[4] = _row("  english passage number 6\n", 104)  # duplicate after stripping
    en1[5] = _row("english passage number 31", 105)  # duplicate inside the second file
    en1[6] = _row("english passage number 31", 106)
    en1[7] = _row("   ", 107)  # empty
    _write(d / "c4-en.tfrecord-00000-of-00002.json.gz", en0)
    _write(d / "c4-en.tfrecord-00001-of-00002.json.gz", en1)
    _write(d / "c4-fr.tfrecord-00000-of-00001.json.gz", [_row(f"texte français {i}", i) for i in range(10)])
    _write(d / "c4-zh-Latn.tfrecord-00000-of-00001.json.gz", [_row(f"zhongwen {i}", i) for i in range(5)])
    _write(
        d / "c4-en-validation.tfrecord-00000-of-00001.json.gz", [_row(f"validation {i}", i) for i in range(7)]
    )
    _write(d / "c4-en.json.gz", [_row("not in the layout", 0)])
    (d / "c4-en.tfrecord-00002-of-00002.json").write_text(json.dumps(_row("not gzipped", 0)) + "\n")
    expected_en = {f"english passage number {i}" for i in range(60)} - {
        f"english passage number {i}" for i in (33, 34, 35, 36, 37)
    }
    return {"dir": tmp_path / "c4", "en": expected_en}


def _records(out) -> list[dict]:
    m = read_manifest(out)
    verify_shards(m)
    return [rec for s in m.shards for _, rec in load_shard(m, s)]


def test_layout_is_found_per_language_and_split(c4):
    files = c4_files(c4["dir"])
    assert {k: [p.name for p in v] for k, v in files.items()} == {
        "en": ["c4-en.tfrecord-00000-of-00002.json.gz", "c4-en.tfrecord-00001-of-00002.json.gz"],
        "fr": ["c4-fr.tfrecord-00000-of-00001.json.gz"],
        "zh-Latn": ["c4-zh-Latn.tfrecord-00000-of-00001.json.gz"],
    }
    assert list(c4_files(c4["dir"] / "multilingual", "validation")) == ["en"]


def test_every_language_streamed_with_exact_duplicates_removed_and_counted(c4, tmp_path):
    m, counts = write_passage_shards([f"c4:{c4['dir']}"], tmp_path / "o", PassageOptions())
    recs = _records(tmp_path / "o")
    by_lang: dict[str, list[dict]] = {}
    for r in recs:
        by_lang.setdefault(r["lang"], []).append(r)
    assert {r["text"] for r in by_lang["en"]} == c4["en"]
    assert len(by_lang["en"]) == len(c4["en"]) == 55
    assert len(by_lang["fr"]) == 10 and len(by_lang["zh-Latn"]) == 5
    assert counts["filtered"] == {"duplicate": 4, "empty": 1}  # 5, 6 (after strip), 31 twice more
    assert counts["written"] == {"en": 55, "fr": 10, "zh-Latn": 5}
    assert counts["c4_files"] == {"en": 2, "fr": 1, "zh-Latn": 1}
    assert m.source["counts"] == counts
    first = next(r for r in by_lang["en"] if r["text"] == "english passage number 0")
    assert first["url"] == "https://example.org/0"
    assert first["source"].endswith("c4-en.tfrecord-00000-of-00002.json.gz")
    # validation split: only its own files
    _, vc = write_passage_shards(
        [f"c4:{c4['dir']}"], tmp_path / "v", PassageOptions(split="validation", languages=["en"])
    )
    assert vc["written"] == {"en": 7}


def test_head_sampling_takes_the_first_and_stops(c4, tmp_path):
    opts = PassageOptions(languages=["en", "fr"], max_per_language=4)
    _, counts = write_passage_shards([f"c4:{c4['dir']}"], tmp_path / "o", opts)
    texts = [r["text"] for r in _records(tmp_path / "o") if r["lang"] == "en"]
    assert texts == [f"english passage number {i}" for i in range(4)]
    assert counts["written"] == {"en": 4, "fr": 4}


def test_reservoir_sampling_is_seeded_and_reaches_past_the_head(c4, tmp_path):
    def sample(seed: int, name: str) -> list[str]:
        opts = PassageOptions(languages=["en"], max_per_language=8, sample="reservoir", seed=seed)
        _, counts = write_passage_shards([f"c4:{c4['dir']}"], tmp_path / name, opts)
        assert counts["written"] == {"en": 8}
        assert counts["filtered"] == {"duplicate": 4, "empty": 1, "not_sampled": 55 - 8}
        return [r["text"] for r in _records(tmp_path / name)]

    a, a2, b = sample(1, "a"), sample(1, "a2"), sample(2, "b")
    assert a == a2 and a != b
    for s in (a, b):
        assert len(set(s)) == 8 and set(s) <= c4["en"]
    # the second file (passages 30..59) is reached: not the head of the stream
    numbers = [int(t.rsplit(" ", 1)[1]) for t in a + b]
    assert max(numbers) >= 30 and numbers != list(range(8))
    # written in stream order
    assert numbers[:8] == sorted(numbers[:8])


def test_reservoir_keeps_every_item_with_probability_k_over_n():
    """Algorithm R against its defining property: over 4,000 seeded runs each of 20 items is kept ~5/20 of the
    time (binomial sd 0.0068; bound 0.03), and always exactly 5 distinct items in stream order."""
    n, k, runs = 20, 5, 4000
    kept = Counter()
    for seed in range(runs):
        r = Reservoir(k, random.Random(seed))
        for i in range(n):
            r.offer(i)
        items = r.items()
        assert len(items) == k and items == sorted(set(items))
        kept.update(items)
    freq = np.array([kept[i] / runs for i in range(n)])
    assert np.abs(freq - k / n).max() < 0.03, freq
    # a head sampler would keep items 0..4 every time: the first and last items are kept equally often
    assert abs(freq[:5].mean() - freq[-5:].mean()) < 0.03


def test_bad_lines_and_a_truncated_file_are_named_or_counted(c4, tmp_path):
    d = c4["dir"] / "multilingual"
    _write(d / "c4-de.tfrecord-00000-of-00002.json.gz", [_row("deutsch 0", 0), "{not json", {"url": "u"}])
    good = gzip.compress("".join(json.dumps(_row(f"deutsch {i}", i)) + "\n" for i in range(1, 200)).encode())
    (d / "c4-de.tfrecord-00001-of-00002.json.gz").write_bytes(good[: len(good) // 2])  # truncated
    opts = PassageOptions(languages=["de"])
    with pytest.raises(DataError, match=r"c4-de\.tfrecord-00000-of-00002\.json\.gz.*line 2.*<json>"):
        write_passage_shards([f"c4:{c4['dir']}"], tmp_path / "o1", opts)
    _write(d / "c4-de.tfrecord-00000-of-00002.json.gz", [_row("deutsch 0", 0)])
    with pytest.raises(DataError, match=r"c4-de\.tfrecord-00001-of-00002\.json\.gz.*<gzip>"):
        write_passage_shards([f"c4:{c4['dir']}"], tmp_path / "o2", opts)
    _write(d / "c4-de.tfrecord-00000-of-00002.json.gz", [_row("deutsch 0", 0), {"url": "u"}])
    with pytest.raises(DataError, match=r"line 2.*'text'"):
        write_passage_shards([f"c4:{c4['dir']}"], tmp_path / "o3", opts)
    _, counts = write_passage_shards(
        [f"c4:{c4['dir']}"], tmp_path / "o4", PassageOptions(languages=["de"], skip_bad=True)
    )
    assert counts["bad"] == {"missing_text": 1, "corrupt_gzip": 1}
    written = counts["written"]["de"]
    assert 1 < written < 200  # the rows before the truncation point are kept
    assert [r["text"] for r in _records(tmp_path / "o4")] == ["deutsch 0"] + [
        f"deutsch {i}" for i in range(1, written)
    ]
    with pytest.raises(DataError, match=r"languages.*c4-xx"):
        write_passage_shards([f"c4:{c4['dir']}"], tmp_path / "o5", PassageOptions(languages=["xx"]))


def test_cli_reports_the_counts(c4, tmp_path, capsys):
    rc = main(
        [
            "data",
            "passages",
            str(tmp_path / "o"),
            "-i",
            f"c4:{c4['dir']}",
            "--languages",
            "en,fr",
            "--max-per-language",
            "6",
            "--sample",
            "reservoir",
            "--seed",
            "3",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    printed = json.loads(out[out.index("{") :])
    assert printed["written"] == {"en": 6, "fr": 6}
    assert printed["filtered"] == {"duplicate": 4, "empty": 1, "not_sampled": (55 - 6) + (10 - 6)}
