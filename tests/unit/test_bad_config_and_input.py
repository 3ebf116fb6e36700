"""Issue 14, items 3, 5 and 8 (unit level): bad configs and bad bytes get errors that name the file, line, field;
secrets never reach `lancer config show`; one undecodable shard record costs one record, not its shard; collection
names are safe as output paths and MLflow metric names."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lancer_dist.cli import main
from lancer_dist.config import ConfigError, load_config
from lancer_dist.data.errors import DataError
from lancer_dist.data.shards import BadRecord, check_passage, load_shard, read_manifest
from lancer_dist.data.sources import PassageOptions, write_passage_shards
from lancer_dist.data.stream import TrainStream
from lancer_dist.retrieval.evaluate import _collection_names, metric_key
from tests.unit.test_stream import LANGS, make_cfg, make_tokenizer

MINIMAL = "model:\n  backbone_config: {model_type: bert}\n  tokenizer: t\n"


# --- item 8: duplicate YAML keys ---------------------------------------------------------------------------------


def test_section_given_twice_is_refused_naming_file_key_and_lines(tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(MINIMAL + "train:\n  steps: 7\n  lr: 0.001\nprobe: {every: 3}\ntrain:\n  steps: 9\n")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    msg = str(err.value)
    assert str(cfg) in msg and "'train'" in msg and "line 4" in msg and "line 8" in msg, msg
    # a key repeated inside a section too
    cfg.write_text(MINIMAL + "train:\n  steps: 7\n  steps: 9\n")
    with pytest.raises(ConfigError, match=r"'steps'.*line 5 and again at line 6"):
        load_config(cfg)
    # the CLI turns it into one line on stderr, exit 2
    assert main(["config", "show", "--config", str(cfg)]) == 2


def test_yaml_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(MINIMAL + "train:\n  <<: {steps: 7, lr: 0.001}\n  steps: 9\n")
    assert load_config(cfg).train.steps == 9


# --- item 8: the tracking URI scheme -----------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["bogus://x", "htp://host:5000", "s3://bucket/mlruns"])
def test_tracking_uri_with_unknown_scheme_is_refused_at_load(uri: str) -> None:
    with pytest.raises(ConfigError, match=r"tracking\.tracking_uri.*http:, https:, file:, sqlite:"):
        load_config(
            None,
            ["model.backbone_config={model_type: bert}", "model.tokenizer=t", f"tracking.tracking_uri={uri}"],
        )


@pytest.mark.parametrize(
    "uri",
    [
        "",
        "sqlite:////tmp/x/mlflow.db",
        "http://127.0.0.1:5000",
        "file:///tmp/mlruns",
        "runs/mlruns",
        "postgresql+psycopg2://u@h/db",
    ],
)
def test_tracking_uri_known_schemes_and_paths_load(uri: str) -> None:
    cfg = load_config(
        None,
        ["model.backbone_config={model_type: bert}", "model.tokenizer=t", f"tracking.tracking_uri={uri}"],
    )
    assert cfg.tracking.tracking_uri == uri


# --- item 3: `lancer config show` and config errors never print a password ---------------------------------------


def test_config_show_and_errors_redact_the_tracking_password(tmp_path: Path, capsys: Any) -> None:
    cfg = tmp_path / "run.yaml"
    cfg.write_text(MINIMAL + "tracking: {tracking_uri: 'http://alice:pw-Zq81x@127.0.0.1:5999/'}\n")
    assert main(["config", "show", "--config", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "pw-Zq81x" not in out and "http://alice:***@127.0.0.1:5999/" in out, out
    # a bad value next to the secret: the error message is redacted too
    assert main(["config", "show", "--config", str(cfg), "tracking.tracking_uri=bogus://bob:pw-Zq81x@h"]) == 2
    err = capsys.readouterr().err
    assert "tracking.tracking_uri" in err and "pw-Zq81x" not in err, err


# --- item 8: a model path that does not exist names its config field ---------------------------------------------


def test_missing_model_directory_names_the_field(tmp_path: Path, capsys: Any) -> None:
    from lancer_dist.config import ModelConfig
    from lancer_dist.model.encoder import build_backbone, load_tokenizer
    from lancer_dist.retrieval.collections import Collection

    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match=r"'model\.name_or_path'.*no-such-model"):
        build_backbone(ModelConfig(name_or_path=missing))
    with pytest.raises(ConfigError, match=r"'model\.tokenizer'.*no-such-tok"):
        load_tokenizer(ModelConfig(name_or_path=missing, tokenizer=str(tmp_path / "no-such-tok")))
    # `lancer eval`: the field that named the model (model.name_or_path, eval.model or eval.lancer_model)
    coll = Collection(
        {"d1": {"text": "a b", "lang": "en"}}, {"q1": {"text": "a", "lang": "en"}}, {"q1": {"d1": 1}}
    ).write_beir(tmp_path / "c")
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(
        f"model: {{name_or_path: {missing}}}\neval: {{collections: [{coll}]}}\ntracking: {{enabled: false}}\n"
    )
    for extra, field in (([], "model.name_or_path"), ([f"eval.model={missing}"], "eval.model")):
        assert main(["eval", "--config", str(cfg), *extra]) == 2
        err = capsys.readouterr().err
        assert f"config field '{field}'" in err and "Traceback" not in err, err
    good = tmp_path / "c"  # a directory, but the lancer model is missing
    assert main(["eval", "--config", str(cfg), f"eval.model={good}", f"eval.lancer_model={missing}"]) == 2
    assert "config field 'eval.lancer_model'" in capsys.readouterr().err


# --- item 8: non-UTF-8 bytes in JSONL sources ---------------------------------------------------------------------


def test_non_utf8_jsonl_source_names_file_line_and_byte_offset(tmp_path: Path) -> None:
    src = tmp_path / "passages.jsonl"
    lines = [json.dumps({"text": f"text {i}", "lang": "en"}).encode() + b"\n" for i in range(5)]
    lines[3] = b'{"text": "caf\xe9", "lang": "fr"}\n'  # latin-1, not UTF-8
    src.write_bytes(b"".join(lines))
    offset = sum(len(x) for x in lines[:3]) + lines[3].index(b"\xe9")
    with pytest.raises(DataError) as err:
        write_passage_shards([f"jsonl:{src}"], tmp_path / "out", PassageOptions())
    msg = str(err.value)
    assert str(src) in msg and "line 4" in msg and f"byte offset {offset}" in msg, msg
    # the same file as a BEIR corpus (evaluation collections)
    from lancer_dist.retrieval.collections import read_beir

    (tmp_path / "beir" / "qrels").mkdir(parents=True)
    corpus = b'{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": "\xff"}\n'
    (tmp_path / "beir" / "corpus.jsonl").write_bytes(corpus)
    bad_at = corpus.index(b"\xff")
    with pytest.raises(DataError, match=rf"corpus\.jsonl: record 'line 2'.*byte offset {bad_at}"):
        read_beir(tmp_path / "beir")


def test_non_utf8_tsv_source_names_file_and_line(tmp_path: Path) -> None:
    src = tmp_path / "p.tsv"
    data = b"id\ttext\n1\tgood\n2\tbad \xc3\x28\n"
    src.write_bytes(data)
    bad_at = data.index(b"\xc3")
    with pytest.raises(DataError, match=rf"p\.tsv: record 'line 3'.*byte offset {bad_at}"):
        write_passage_shards([f"tsv:{src}"], tmp_path / "out", PassageOptions(lang="en"))


# --- item 8: one undecodable record in a shard costs that record only ---------------------------------------------


def _plant_bad_bytes(root: Path, key: str) -> str:
    """Replace record ``key``'s JSON by latin-1 bytes (invalid UTF-8) and fix the shard's sha256 in the manifest."""
    import webdataset as wds

    m = read_manifest(root)
    for s in m.shards:
        recs = load_shard(m, s)
        if any(k == key for k, _ in recs):
            path = root / s.name
            with open(path, "wb") as f, wds.TarWriter(f, mtime=0.0, encoder=False) as tw:
                for k, r in recs:
                    payload = b'{"text": "caf\xe9", "lang": "en"}' if k == key else json.dumps(r).encode()
                    tw.write({"__key__": k, "json": payload})
            d = json.loads((root / "manifest.json").read_text())
            for sd in d["shards"]:
                if sd["name"] == s.name:
                    sd["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
            (root / "manifest.json").write_text(json.dumps(d))
            return s.name
    raise KeyError(key)


def test_one_non_utf8_record_is_skipped_alone_and_counted(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, **{"data.skip_bad_records": True, "data.shuffle_buffer": 0})
    name = _plant_bad_bytes(tmp_path / "erasure", "en-005")
    m = read_manifest(tmp_path / "erasure")
    recs = dict(load_shard(m, next(s for s in m.shards if s.name == name)))
    assert isinstance(recs["en-005"], BadRecord) and len(recs) == 4  # the shard's other 3 records are intact
    with pytest.raises(
        DataError, match=rf"{re.escape(name)}.*record 'en-005' field '<json>': not valid UTF-8"
    ):
        check_passage(name, "en-005", recs["en-005"])
    st = TrainStream.from_config(cfg, make_tokenizer(), rank=0, world_size=1)
    seen: Counter[str] = Counter()
    for b in st:
        seen.update(b.erasure_keys)
        assert Counter(k.split("-")[0] for k in b.erasure_keys) == dict.fromkeys(LANGS, 2)
    assert "en-005" not in seen
    # the shard's other records were read (on main the whole shard was skipped)
    assert {k for k in recs if k != "en-005"} <= set(seen)
    epochs = st.state_dict()["streams"]["erasure/en"]["epoch"] + 1
    assert st.stats == {"bad_records": epochs, "bad_records.bad_utf8": epochs}
    # without skipping: an error naming shard, record and field
    with pytest.raises(DataError, match=r"record 'en-005' field '<json>'"):
        list(
            TrainStream.from_config(
                make_cfg(tmp_path, **{"data.shuffle_buffer": 0}), make_tokenizer(), rank=0, world_size=1
            )
        )


# --- item 5: collection names are safe relative paths and metric names ------------------------------------------


def test_collection_listed_twice_is_refused(tmp_path: Path) -> None:
    a = tmp_path / "colls" / "a"
    a.mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"eval\.collections.*entries 0 and 2"):
        _collection_names([a, tmp_path / "colls" / "b", tmp_path / "colls" / ".." / "colls" / "a"])


def test_collection_names_are_relative_and_mlflow_safe(tmp_path: Path) -> None:
    paths = [tmp_path / "x" / "mono lingual" / "fr@1", tmp_path / "y" / "fr@1", tmp_path / "x"]
    names = _collection_names(paths)
    assert len(set(names)) == 3
    for n in names:
        assert not Path(n).is_absolute() and ".." not in Path(n).parts
        assert re.fullmatch(r"[A-Za-z0-9_\-. /]+", n), n
    assert _collection_names([tmp_path / "only"]) == ["only"]


def test_metric_key_is_valid_for_mlflow() -> None:
    from mlflow.utils.validation import _validate_metric_name

    for parts in [
        ("base+LSAR", "/abs/path/coll", "all", "nDCG@10"),
        ("base", "../up", "fr", "RR@10"),
        ("lancer", "a//b", "zh", "Recall@5kt"),
        ("base", "é ü", "und", "P@5"),
    ]:
        key = metric_key(*parts)
        _validate_metric_name(key)  # raises on a name MLflow refuses
        assert not key.startswith("/") and "//" not in key and ".." not in key.split("/"), key
    assert (
        metric_key("base+LSAR", "monolingual/fr", "all", "nDCG@10")
        == "baseplus_LSAR/monolingual/fr/all/nDCG_at_10"
    )
