"""Issue 14, item 4: the training-time language probe reads its shards through the checked reader.

Each case plants a real defect in real shards (written by ShardWriter) and builds the probe the way the trainer
does (``build_probe(cfg, languages)``). On main (6e685fb) the probe read every shard of the manifest with the
unchecked ``iter_shard``: a corrupt shard of an unused language killed training, a missing shard was a bare
FileNotFoundError even with skipping on, and a shard truncated at a header boundary gave 25 of 40 records silently.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lancer_dist.config import RunConfig, load_config
from lancer_dist.data import shards as shards_mod
from lancer_dist.data.errors import DataError
from lancer_dist.data.shards import ShardWriter, read_manifest
from lancer_dist.train.probe import POOL_FACTOR, build_probe, load_probe_pool

LANGS = ["de", "en", "fr", "zh"]


def _write(root: Path, per_lang: int = 40, per_shard: int = 40) -> Path:
    with ShardWriter(root, "passages", max_records_per_shard=per_shard, group_by_language=True) as w:
        for lang in LANGS:
            for i in range(per_lang):
                w.write(f"{lang}-{i:03d}", {"text": f"{lang} text number {i}", "lang": lang})
    return root


def _shard(root: Path, lang: str, index: int = 0) -> Path:
    names = [s.name for s in read_manifest(root).shards if s.languages.get(lang)]
    return root / names[index]


def _cfg(root: Path, **over: Any) -> RunConfig:
    items = {
        "model.backbone_config": {"model_type": "bert"},
        "model.tokenizer": "unused",
        "data.erasure.path": str(root.parent / "training-passages"),
        "probe.path": str(root),
        "probe.train_per_language": 4,
        "probe.test_per_language": 2,
        **over,
    }
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in items.items()])


def test_corrupt_shard_of_an_unused_language_is_never_read(tmp_path: Path) -> None:
    root = _write(tmp_path / "d")
    zh = _shard(root, "zh")
    zh.write_bytes(zh.read_bytes()[:700])  # a corrupt zh shard; the run uses de, en, fr only
    probe = build_probe(_cfg(root), ["de", "en", "fr"])
    assert probe is not None and probe.languages == ["de", "en", "fr"]
    assert probe.skipped == {}
    assert Counter(probe.y_train.tolist()) == {0: 4, 1: 4, 2: 4}


def test_missing_shard_is_named_or_skipped_and_counted(tmp_path: Path, caplog: Any) -> None:
    root = _write(tmp_path / "d", per_lang=60, per_shard=20)
    missing = _shard(root, "en", 0)
    missing.unlink()
    with pytest.raises(DataError, match=rf"{missing.name} .*cannot read shard"):
        build_probe(_cfg(root), None)
    caplog.set_level(logging.WARNING)
    probe = build_probe(_cfg(root, **{"data.skip_bad_records": True}), None)
    assert probe is not None and probe.languages == LANGS
    assert probe.skipped == {"bad_shards": 1, "bad_shards.missing_shard": 1}
    assert "skipped" in caplog.text and "bad_shards.missing_shard" in caplog.text
    out = probe.evaluate(
        lambda texts: [[float(len(t)), float(t[0] == "e"), float(t[0] == "f")] for t in texts]
    )
    assert out["probe_skipped_shards"] == 1.0 and out["probe_skipped_records"] == 0.0


def test_shard_truncated_at_a_header_boundary_is_caught(tmp_path: Path) -> None:
    root = _write(tmp_path / "d", per_lang=80, per_shard=40)  # two shards per language
    en = _shard(root, "en", 0)
    with tarfile.open(en) as tf:
        members = tf.getmembers()
    assert len(members) == 40
    en.write_bytes(en.read_bytes()[: members[25].offset])  # 25 whole records, cut exactly at a header
    big = {"probe.train_per_language": 20, "probe.test_per_language": 10}  # needs every shard
    with pytest.raises(DataError, match=rf"{en.name} .*truncated"):
        build_probe(_cfg(root, **big), None)
    probe = build_probe(_cfg(root, **big, **{"data.skip_bad_records": True}), None)
    assert probe is not None and probe.languages == LANGS  # en's second shard is enough
    assert probe.skipped == {"bad_shards": 1, "bad_shards.corrupt_tar": 1}
    assert not any(
        t.startswith("en text number ") and int(t.rsplit(" ", 1)[1]) < 40 for t in probe.train_texts
    )


def test_bad_record_is_named_or_skipped_alone(tmp_path: Path) -> None:
    root = tmp_path / "d"
    with ShardWriter(root, "passages", max_records_per_shard=40, group_by_language=True) as w:
        for lang in LANGS:
            for i in range(40):
                w.write(f"{lang}-{i:03d}", {"text": f"{lang} text number {i}", "lang": lang})
    # plant an empty text in en-003 (rewriting the shard and its manifest entry)
    import hashlib

    import webdataset as wds

    m = read_manifest(root)
    shard = next(s for s in m.shards if s.languages.get("en"))
    recs = shards_mod.load_shard(m, shard)
    path = root / shard.name
    with open(path, "wb") as f, wds.TarWriter(f, mtime=0.0, encoder=False) as tw:
        for k, r in recs:
            tw.write({"__key__": k, "json": json.dumps({**r, "text": " "} if k == "en-003" else r).encode()})
    d = json.loads((root / "manifest.json").read_text())
    for s in d["shards"]:
        if s["name"] == shard.name:
            s["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match=r"record 'en-003' field 'text'"):
        build_probe(_cfg(root), None)
    probe = build_probe(_cfg(root, **{"data.skip_bad_records": True}), None)
    assert probe is not None and probe.skipped == {"bad_records": 1, "bad_records.empty_text": 1}


def test_reads_only_the_shards_it_needs_and_stays_bounded(tmp_path: Path, monkeypatch: Any) -> None:
    root = _write(tmp_path / "d", per_lang=100, per_shard=10)  # 10 shards per language
    opened: list[str] = []
    real = shards_mod.load_shard

    def spy(manifest: Any, shard: Any, **kw: Any) -> Any:
        opened.append(shard.name)
        return real(manifest, shard, **kw)

    monkeypatch.setattr(shards_mod, "load_shard", spy)
    need = 4 + 2
    pairs, langs, counter = load_probe_pool(root, ["en", "fr"], POOL_FACTOR * need, skip_bad=False, seed=0)
    assert langs == ["en", "fr"] and counter.as_dict() == {}
    per_lang = Counter(lang for _, lang in pairs)
    assert per_lang == {"en": POOL_FACTOR * need, "fr": POOL_FACTOR * need}  # 24 each, not all 100
    # 24 texts per language from shards of 10: at most 3 shards per language, none of de / zh
    m = read_manifest(root)
    lang_of = {s.name: next(iter(s.languages)) for s in m.shards}
    assert Counter(lang_of[n] for n in opened) == {"en": 3, "fr": 3}, opened
    assert len({t for t, _ in pairs}) == len(pairs)


def test_no_held_out_set_means_no_probe_and_the_training_data_is_refused(tmp_path: Path, caplog: Any) -> None:
    """The probe never tests on passages the training stream yields: without ``probe.path`` it is off (with a
    warning saying why and what to give), and ``probe.path`` naming the erasure data is a ConfigError."""
    import logging

    from lancer_dist.config import ConfigError

    root = _write(tmp_path / "d")
    caplog.set_level(logging.WARNING)
    assert build_probe(_cfg(root, **{"probe.path": ""}), None) is None
    assert "language probe off" in caplog.text and "--split validation" in caplog.text
    for same in (str(root), str(root) + "/", f"{root}/manifest.json", str(tmp_path / "x" / ".." / "d")):
        with pytest.raises(ConfigError, match=r"probe\.path"):
            _cfg(root, **{"data.erasure.path": str(root), "probe.path": same})
    with pytest.raises(ConfigError, match=r"probe\.path"):
        _cfg(root, **{"data.erasure.path": "http://127.0.0.1:1/d/", "probe.path": "http://127.0.0.1:1/d"})
    assert build_probe(_cfg(root, **{"data.erasure.path": "http://127.0.0.1:1/d"}), None) is not None
