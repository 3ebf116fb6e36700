"""ShardWriter / manifest / shard reader: round trip, validation on write, and each kind of bad shard."""

from __future__ import annotations

import hashlib
import json
import re
import tarfile
from pathlib import Path

import pytest

from lancer_dist.data.errors import DataError
from lancer_dist.data.shards import ShardWriter, iter_shard, load_shard, read_manifest, verify_shards


def _passages(n_per_lang: int, langs: list[str]) -> list[tuple[str, dict]]:
    out = []
    for i in range(n_per_lang):
        for lang in langs:
            out.append((f"{lang}-{i}", {"text": f"text {lang} {i} ü", "lang": lang, "id": f"{lang}-{i}"}))
    return out


def _write(tmp: Path, items, **kw) -> Path:
    with ShardWriter(tmp, "passages", **kw) as w:
        for k, r in items:
            w.write(k, r)
    return tmp


def test_roundtrip_counts_and_checksums_match_an_independent_reading(tmp_path: Path) -> None:
    items = _passages(7, ["en", "fr", "zh"])
    _write(tmp_path, items, max_records_per_shard=3, source={"from": "test"})
    m = read_manifest(tmp_path)
    assert m.kind == "passages" and m.num_records == 21 and m.totals == {"en": 7, "fr": 7, "zh": 7}
    assert m.source == {"from": "test"}
    # one language per shard (group_by_language default), ceil(7/3)=3 shards per language
    assert len(m.shards) == 9 and all(len(s.languages) == 1 for s in m.shards)
    seen = {}
    for s in m.shards:
        raw = (tmp_path / s.name).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == s.sha256 and len(raw) == s.num_bytes
        # independent reading with the standard library's tarfile
        with tarfile.open(tmp_path / s.name) as tf:
            members = tf.getmembers()
            assert len(members) == s.num_records
            for mem in members:
                key, ext = mem.name.split(".", 1)
                assert ext == "json"
                f = tf.extractfile(mem)
                assert f is not None
                seen[key] = json.loads(f.read().decode())
    assert seen == dict(items)
    assert verify_shards(m) == {"shards": 9, "records": 21}
    assert [k for k, _ in iter_shard(tmp_path / m.shards[0].name)] == ["en-0", "en-1", "en-2"]


def test_shards_are_reproducible(tmp_path: Path) -> None:
    items = _passages(5, ["en", "de"])
    a = read_manifest(_write(tmp_path / "a", items))
    b = read_manifest(_write(tmp_path / "b", items))
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]


def test_groups_manifest(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "groups", max_records_per_shard=2) as w:
        for i in range(5):
            neg = [{"docid": f"n{i}-{j}", "text": f"neg {j}"} for j in range(i + 1)]
            w.write(
                f"q{i}",
                {"query": f"query {i}", "positives": [{"docid": f"p{i}", "text": "pos"}], "negatives": neg},
            )
    m = read_manifest(tmp_path)
    assert m.kind == "groups" and m.num_records == 5 and [s.num_records for s in m.shards] == [2, 2, 1]
    assert [s.min_negatives for s in m.shards] == [1, 3, 5]
    assert m.totals == {"und": 5}
    verify_shards(m)


@pytest.mark.parametrize(
    ("kind", "record", "field"),
    [
        ("passages", {"lang": "en"}, "text"),
        ("passages", {"text": "  ", "lang": "en"}, "text"),
        ("passages", {"text": "x"}, "lang"),
        ("passages", {"text": 3, "lang": "en"}, "text"),
        ("groups", {"positives": [{"docid": "a", "text": "t"}], "negatives": []}, "query"),
        ("groups", {"query": "q", "positives": [], "negatives": []}, "positives"),
        (
            "groups",
            {"query": "q", "positives": [{"docid": "a", "text": "t"}], "negatives": [{"docid": "b"}]},
            "negatives[0].text",
        ),
        ("groups", {"query": "q", "positives": [{"text": "t"}], "negatives": []}, "positives[0].docid"),
    ],
)
def test_write_validation_names_key_and_field(tmp_path: Path, kind: str, record: dict, field: str) -> None:
    w = ShardWriter(tmp_path, kind)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=re.escape(f"record 'bad-1' field '{field}'")) as ei:
        w.write("bad-1", record)
    assert isinstance(ei.value, DataError) and ei.value.field == field


def test_bad_keys_duplicates_and_abort(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="duplicate"), ShardWriter(tmp_path, "passages") as w:
        w.write("a", {"text": "t", "lang": "en"})
        w.write("a", {"text": "u", "lang": "en"})
    # the exception aborted the writer: no manifest, no partial shards
    assert list(tmp_path.iterdir()) == []
    w = ShardWriter(tmp_path, "passages")
    for bad in ["a.b", "a/b", "", "a b"]:
        with pytest.raises(DataError, match="__key__"):
            w.write(bad, {"text": "t", "lang": "en"})
    w.write("ok", {"text": "t", "lang": "en"})
    w.close()
    with pytest.raises(FileExistsError):
        ShardWriter(tmp_path, "passages")
    ShardWriter(tmp_path, "passages", overwrite=True).close()
    assert read_manifest(tmp_path).num_records == 0


def test_truncated_tar_names_shard_and_last_key(tmp_path: Path) -> None:
    _write(tmp_path, _passages(50, ["en"]))
    m = read_manifest(tmp_path)
    p = tmp_path / m.shards[0].name
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2 + 100])
    with pytest.raises(DataError, match=r"shard-000000\.tar.*field 'tar'.*truncated") as ei:
        load_shard(m, m.shards[0])
    assert ei.value.key is not None and ei.value.key.startswith("en-")
    p.write_bytes(b"garbage" * 100)
    with pytest.raises(DataError, match="field 'tar'"):
        load_shard(m, m.shards[0])
    p.unlink()
    with pytest.raises(DataError, match="field 'file'"):
        load_shard(m, m.shards[0])


def test_checksum_and_count_mismatch(tmp_path: Path) -> None:
    _write(tmp_path, _passages(4, ["en"]))
    mpath = tmp_path / "manifest.json"
    d = json.loads(mpath.read_text())
    d["shards"][0]["sha256"] = "0" * 64
    mpath.write_text(json.dumps(d))
    m = read_manifest(tmp_path)
    with pytest.raises(DataError, match="field 'sha256'"):
        load_shard(m, m.shards[0])
    assert len(load_shard(m, m.shards[0], verify_checksum=False)) == 4
    # consistent manifest arithmetic, but disagreeing with the shard itself
    d = json.loads(mpath.read_text())
    d["shards"][0]["sha256"] = hashlib.sha256((tmp_path / "shard-000000.tar").read_bytes()).hexdigest()
    d["shards"][0]["num_records"] = 5
    d["shards"][0]["languages"] = {"en": 5}
    d["totals"] = {"en": 5}
    d["num_records"] = 5
    mpath.write_text(json.dumps(d))
    m = read_manifest(tmp_path)
    with pytest.raises(DataError, match=r"field 'num_records'.*holds 4 records, the manifest says 5"):
        load_shard(m, m.shards[0])
    # inconsistent manifest arithmetic is caught when reading the manifest
    d["totals"] = {"en": 6}
    mpath.write_text(json.dumps(d))
    with pytest.raises(DataError, match="field 'totals'"):
        read_manifest(tmp_path)


def test_verify_catches_unknown_language_in_shard(tmp_path: Path) -> None:
    _write(tmp_path, _passages(3, ["en"]))
    # rewrite the shard with one record relabelled to a language the manifest does not know
    m = read_manifest(tmp_path)
    recs = load_shard(m, m.shards[0])
    recs[1][1]["lang"] = "xx"
    with ShardWriter(tmp_path / "tmp", "passages", group_by_language=False) as w:
        for k, r in recs:
            w.write(k, r)
    (tmp_path / "tmp" / "shard-000000.tar").replace(tmp_path / "shard-000000.tar")
    d = json.loads((tmp_path / "manifest.json").read_text())
    d["shards"][0]["sha256"] = hashlib.sha256((tmp_path / "shard-000000.tar").read_bytes()).hexdigest()
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match=r"record 'en-1' field 'lang': unknown language code 'xx'"):
        verify_shards(read_manifest(tmp_path))


def test_fast_reader_equals_tarfile_and_pax_shards_still_read(tmp_path: Path) -> None:
    """ShardWriter's plain ustar shards take the fast parser; a PAX shard (float mtime, as older writers made)
    takes webdataset's reader; both give the same records. A flipped header byte is a checksum error."""
    import io

    import webdataset as wds

    from lancer_dist.data.shards import _fast_members

    _write(tmp_path / "a", _passages(6, ["en"]))
    m = read_manifest(tmp_path / "a")
    raw = (tmp_path / "a" / m.shards[0].name).read_bytes()
    members = _fast_members(raw, "x")
    assert members is not None
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        ref = [(mem.name, tf.extractfile(mem).read()) for mem in tf.getmembers()]  # type: ignore[union-attr]
    assert members == ref
    buf = io.BytesIO()
    with wds.TarWriter(buf, mtime=0.5, encoder=False) as tw:
        for k, r in _passages(6, ["en"]):
            tw.write({"__key__": k, "json": json.dumps(r).encode()})
    pax = buf.getvalue()
    assert _fast_members(pax, "x") is None  # PAX headers: not the fast path
    p = tmp_path / "a" / m.shards[0].name
    p.write_bytes(pax)
    d = json.loads((tmp_path / "a" / "manifest.json").read_text())
    d["shards"][0]["sha256"] = hashlib.sha256(pax).hexdigest()
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(d))
    assert load_shard(read_manifest(tmp_path / "a"), m.shards[0], verify_checksum=False) == [
        (k, r) for k, r in _passages(6, ["en"])
    ]
    bad = bytearray(raw)
    bad[512 + 512 + 5] ^= 0xFF  # inside the 2nd member's header name
    with pytest.raises(DataError, match=r"record 'en-0' field 'tar'.*checksum"):
        _fast_members(bytes(bad), "x")
