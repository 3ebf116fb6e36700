"""Bad input in the training stream: each case is an error naming shard, record key and field, or (with
``data.skip_bad_records``) skipped, counted exactly, and the batches stay exactly balanced."""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lancer_dist.data.errors import DataError, SkipCounter
from lancer_dist.data.shards import load_shard, read_manifest
from lancer_dist.data.stream import SubStream, TrainStream
from tests.unit.test_stream import LANGS, erasure_plan, make_cfg, make_tokenizer, write_groups, write_passages


@pytest.fixture(scope="module")
def tok() -> Any:
    return make_tokenizer()


def _rewrite(root: Path, shard_name: str, records: list[tuple[str, Any]]) -> None:
    """Rewrite one shard with exactly ``records`` (no validation) and fix its sha256 in the manifest, so that the
    planted defect is the only one."""
    import webdataset as wds

    path = root / shard_name
    with open(path, "wb") as f, wds.TarWriter(f, mtime=0.0, encoder=False) as tw:
        for key, rec in records:
            tw.write({"__key__": key, "json": json.dumps(rec).encode()})
    mpath = root / "manifest.json"
    d = json.loads(mpath.read_text())
    for s in d["shards"]:
        if s["name"] == shard_name:
            s["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    mpath.write_text(json.dumps(d))


def _shard_of(root: Path, key: str) -> tuple[str, list[tuple[str, Any]]]:
    m = read_manifest(root)
    for s in m.shards:
        recs = load_shard(m, s)
        if any(k == key for k, _ in recs):
            return s.name, recs
    raise KeyError(key)


def plant(root: Path, case: str) -> tuple[str, str | None, str, str]:
    """Plant one defect; returns (shard name, key or None, field, counter name)."""
    if case == "truncated_tar":
        name, _ = _shard_of(root, "en-004")
        p = root / name
        p.write_bytes(p.read_bytes()[:1500])  # cut inside the 2nd member: the error names the last good key
        return name, "en-004", "tar", "bad_shards.corrupt_tar"
    if case == "count_mismatch":
        name, recs = _shard_of(root, "en-004")
        _rewrite(root, name, recs[:-1])
        return name, None, "num_records", "bad_shards.manifest_mismatch"
    if case == "language_count_mismatch":
        name, recs = _shard_of(root, "en-004")
        recs = [(k, {**r, "lang": "fr"} if k == "en-004" else r) for k, r in recs]
        _rewrite(root, name, recs)
        return name, None, "languages", "bad_shards.manifest_mismatch"
    name, recs = _shard_of(root, "en-005")
    edit: dict[str, Any] = {
        "missing_text": {"lang": "en"},
        "empty_text": {"lang": "en", "text": "   "},
        "unknown_lang": {"lang": "xx", "text": "w1 w2"},
        "missing_lang": {"text": "w1 w2"},
    }[case]
    field = "lang" if "lang" in case else "text"
    _rewrite(root, name, [(k, edit if k == "en-005" else r) for k, r in recs])
    return name, "en-005", field, f"bad_records.{case}"


CASES = ["missing_text", "empty_text", "unknown_lang", "missing_lang", "truncated_tar", "count_mismatch"]


@pytest.mark.parametrize("case", [*CASES, "language_count_mismatch"])
@pytest.mark.parametrize("workers", [0, 2])
def test_bad_erasure_input_raises_naming_shard_key_field(
    tmp_path: Path, tok: Any, case: str, workers: int
) -> None:
    if workers and case not in ("missing_text", "truncated_tar"):
        pytest.skip("the worker path is covered by two cases")
    cfg = make_cfg(tmp_path, **{"data.num_workers": workers})
    name, key, field, _ = plant(tmp_path / "erasure", case)
    rec = f"record '{key}'" if key else "(no record)"
    pattern = re.escape(f"{name} (in {tmp_path / 'erasure'}): {rec} field '{field}'")
    with pytest.raises((DataError, RuntimeError), match=pattern):
        list(TrainStream.from_config(cfg, tok, rank=0, world_size=1))


@pytest.mark.parametrize("case", CASES)
def test_bad_erasure_input_is_skipped_counted_and_balance_holds(tmp_path: Path, tok: Any, case: str) -> None:
    cfg = make_cfg(tmp_path, **{"data.skip_bad_records": True, "data.shuffle_buffer": 0})
    _, _, _, counter = plant(tmp_path / "erasure", case)
    st = TrainStream.from_config(cfg, tok, rank=0, world_size=1)
    batches = list(st)
    for b in batches:
        assert Counter(k.split("-")[0] for k in b.erasure_keys) == dict.fromkeys(LANGS, 2)
        assert "en-005" not in b.erasure_keys or case in ("truncated_tar", "count_mismatch")
    # without shuffling the defect is met once at the start of each of the 'en' stream's epochs
    epochs = st.state_dict()["streams"]["erasure/en"]["epoch"] + 1
    level = counter.split(".")[0]
    assert st.stats == {counter: epochs, level: epochs}
    assert epochs >= 2
    # the counters are those of the global stream: every rank of a 2-rank run reports the same whole-run counts
    for r in range(2):
        other = TrainStream.from_config(cfg, tok, rank=r, world_size=2)
        list(other)
        assert other.stats == st.stats


def test_each_bad_record_is_counted_by_exactly_one_slot(tmp_path: Path) -> None:
    """Over one epoch, the counters of all slots (ranks x workers) add up to the planted defects exactly, in both
    the shard split (en: 4 shards) and the record stride (S > shards) modes."""
    root = write_passages(tmp_path / "erasure")
    make_cfg(tmp_path)  # writes retrieval data too
    plant(root, "missing_text")  # en-005
    name, recs = _shard_of(root, "en-010")
    _rewrite(
        root, name, [(k, {"lang": "en", "text": ""} if k in ("en-010", "en-011") else r) for k, r in recs]
    )
    m = read_manifest(root)
    plan = erasure_plan(m, skip=True)
    for S in (1, 2, 4, 5, 9):
        total: Counter[str] = Counter()
        keys: list[str] = []
        for slot in range(S):
            c = SkipCounter()
            sub = SubStream(
                plan.erasure_spec("en"), slot, S, seed=3, shuffle_buffer=4, skip_bad=True, counter=c
            )
            keys += [k for k, _, _ in sub._shuffled(0)]
            total.update(c.counts)
        assert total == {"bad_records": 3, "bad_records.missing_text": 1, "bad_records.empty_text": 2}, S
        assert sorted(keys) == sorted(f"en-{i:03d}" for i in range(13) if i not in (5, 10, 11))


def test_group_with_too_few_negatives(tmp_path: Path, tok: Any) -> None:
    cfg = make_cfg(tmp_path, **{"data.retrieval.group_size": 7})  # groups store 5 negatives
    with pytest.raises(DataError, match=r"shard-000000\.tar.*field 'negatives'.*group_size=7 needs 6"):
        TrainStream.from_config(cfg, tok, rank=0, world_size=1)
    # a shard without the manifest hint fails at the record itself, naming its key
    d = json.loads((tmp_path / "retrieval" / "manifest.json").read_text())
    for s in d["shards"]:
        s.pop("min_negatives")
    (tmp_path / "retrieval" / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(
        DataError, match=r"record 'q0\d\d' field 'negatives': 5 negatives, group_size 7 needs 6"
    ):
        list(
            TrainStream.from_config(
                make_cfg(tmp_path, **{"data.retrieval.group_size": 7}), tok, rank=0, world_size=1
            )
        )
    # skipping: every group is too small here, so the stream reports it has nothing left instead of looping
    cfg = make_cfg(tmp_path, **{"data.retrieval.group_size": 7, "data.skip_bad_records": True})
    with pytest.raises(DataError, match="no usable record"):
        list(TrainStream.from_config(cfg, tok, rank=0, world_size=1))


def test_skipped_small_groups_are_counted(tmp_path: Path, tok: Any) -> None:
    write_groups(tmp_path / "retrieval", n=30, n_neg=2)
    name, recs = _shard_of(tmp_path / "retrieval", "q000")
    # q000 keeps 2 negatives, the others get 4; group size 4 needs 3
    _rewrite(
        tmp_path / "retrieval",
        name,
        [(k, r if k == "q000" else {**r, "negatives": r["negatives"] * 2}) for k, r in recs],
    )
    for rest in [s for s in read_manifest(tmp_path / "retrieval").shards if s.name != name]:
        m = read_manifest(tmp_path / "retrieval")
        _rewrite(
            tmp_path / "retrieval",
            rest.name,
            [
                (k, {**r, "negatives": r["negatives"] * 2})
                for k, r in load_shard(m, rest, verify_checksum=False)
            ],
        )
    cfg = make_cfg(
        tmp_path, **{"data.retrieval.group_size": 4, "data.skip_bad_records": True, "data.shuffle_buffer": 0}
    )
    st = TrainStream.from_config(cfg, tok, rank=0, world_size=1)
    batches = list(st)
    assert all("q000" not in b.query_keys and len(b.passage_docids) == 16 for b in batches)
    epochs = st.state_dict()["streams"]["retrieval"]["epoch"] + 1
    assert st.stats == {"bad_records": epochs, "bad_records.too_few_negatives": epochs}


_EXIT_PROGRAM = """
import sys
from pathlib import Path
from lancer_dist.data.stream import TrainStream
from tests.unit.test_stream import make_cfg, make_tokenizer

cfg = make_cfg(Path(sys.argv[1]), **{"data.num_workers": 2})
try:
    list(TrainStream.from_config(cfg, make_tokenizer(), rank=0, world_size=1))
except Exception as e:
    KEPT = e  # the traceback (and the loader iterator in its frames) stays alive until exit, as under pytest
    print("raised", type(e).__name__, flush=True)
"""


def test_a_worker_error_does_not_leave_the_process_hanging_at_exit(tmp_path: Path) -> None:
    """The loader workers ignore SIGTERM (preemption handling); a DataError raised in one must still let the
    process exit: TrainStream shuts its workers down itself (else multiprocessing's exit handler SIGTERMs and
    joins them forever, and `lancer train` on bad data would hang instead of exiting 1)."""
    import os
    import subprocess
    import sys

    make_cfg(tmp_path)
    plant(tmp_path / "erasure", "missing_text")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-c", _EXIT_PROGRAM, str(tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        from tests.servers import stop_process_group

        stop_process_group(proc, timeout=2, sig=9)
        pytest.fail("the process did not exit within 60 s after a loader worker raised")
    assert proc.returncode == 0, out.decode()
    assert b"raised DataError" in out or b"raised RuntimeError" in out, out.decode()
