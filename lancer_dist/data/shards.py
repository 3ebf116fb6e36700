"""Webdataset tar shards plus a JSON manifest: the on-disk format of every training data set.

A shard directory holds ``shard-000000.tar``, ``shard-000001.tar``, ... and ``manifest.json``. Each webdataset
sample is ``<key>.json``: one UTF-8 JSON object (the record). Two kinds of records:

* ``passages``: ``{"text": str, "lang": str, ...}`` (optional ``id``, ``title``, ``doc``, ... are kept as given).
* ``groups``:   ``{"query": str, "positives": [{"docid", "text", "title"?}, ...], "negatives": [...], "query_id"?}``.
  All stored negatives are kept; the group size is chosen when reading.

The manifest records, per shard, its record count, per-language counts, byte size and sha256, plus totals and the
``source`` dict the writer was given (where the data came from and with which options). Readers check the shards
against it, so a truncated shard or a manifest that disagrees with its shards is an error naming the shard.

Shards are reproducible: same records in the same order give byte-identical tars (fixed mtime/owner), so the
checksums identify content. Passage writers by default keep one open shard per language (``group_by_language``),
so each shard holds one language and the language-balanced reader never reads a shard it does not need.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from lancer_dist.data.errors import BadRecord, DataError
from lancer_dist.fileio import atomic_write_text

__all__ = [
    "FORMAT_VERSION",
    "BadRecord",
    "Manifest",
    "ShardInfo",
    "ShardWriter",
    "check_group",
    "check_passage",
    "is_url",
    "iter_shard",
    "load_shard",
    "read_manifest",
    "stream_shard",
    "verify_shards",
]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
Kind = Literal["passages", "groups"]
_KINDS = ("passages", "groups")
# Webdataset splits a member name at the first dot after the last slash, so keys cannot contain either.
_BAD_KEY = re.compile(r"[./\\\x00\s]")
_LANG = re.compile(r"^[A-Za-z0-9_-]+$")
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
# A group record without a "lang" field is counted under this code (ISO 639-2 "undetermined").
UNDETERMINED = "und"


# --------------------------------------------------------------------------------------------------------------
# Record validation (shared by the writer and the readers)
# --------------------------------------------------------------------------------------------------------------


def _nonempty_str(where: str, key: str, rec: dict[str, Any], name: str, label: str | None = None) -> str:
    label = label or name
    if name not in rec:
        raise DataError(where, key, label, "missing", reason=f"missing_{name}")
    value = rec[name]
    if not isinstance(value, str):
        raise DataError(
            where, key, label, f"expected a string, got {type(value).__name__}", reason=f"bad_{name}"
        )
    if not value.strip():
        raise DataError(where, key, label, "empty text", reason=f"empty_{name}")
    return value


def _check_object(where: str, key: str, rec: Any) -> None:
    """A record that could not be decoded raises its error; one that is not a JSON object is ``not_object``."""
    if isinstance(rec, BadRecord):
        raise rec.error
    if not isinstance(rec, dict):
        raise DataError(
            where, key, "<record>", f"expected a JSON object, got {type(rec).__name__}", "not_object"
        )


def check_passage(where: str, key: str, rec: Any, languages: Collection[str] | None = None) -> None:
    """Raise :class:`DataError` unless ``rec`` is a passage record (non-empty ``text``, a language code ``lang``
    that is in ``languages`` when given)."""
    _check_object(where, key, rec)
    _nonempty_str(where, key, rec, "text")
    lang = _nonempty_str(where, key, rec, "lang")
    if not _LANG.match(lang):
        raise DataError(where, key, "lang", f"not a language code: {lang!r}", reason="bad_lang")
    if languages is not None and lang not in languages:
        raise DataError(
            where, key, "lang", f"unknown language code {lang!r} (known: {sorted(languages)})", "unknown_lang"
        )


def _check_passage_list(where: str, key: str, rec: dict[str, Any], name: str, allow_empty: bool) -> None:
    if name not in rec:
        raise DataError(where, key, name, "missing", reason=f"missing_{name}")
    items = rec[name]
    if not isinstance(items, list):
        raise DataError(
            where, key, name, f"expected a list, got {type(items).__name__}", reason=f"bad_{name}"
        )
    if not items and not allow_empty:
        raise DataError(where, key, name, "empty list", reason=f"empty_{name}")
    for i, p in enumerate(items):
        label = f"{name}[{i}]"
        if not isinstance(p, dict):
            raise DataError(where, key, label, "expected an object {docid, text}", reason=f"bad_{name}")
        if not isinstance(p.get("docid"), str):
            raise DataError(where, key, f"{label}.docid", "missing or not a string", reason="bad_docid")
        _nonempty_str(where, key, p, "text", f"{label}.text")
        if "title" in p and not isinstance(p["title"], str):
            raise DataError(where, key, f"{label}.title", "expected a string", reason="bad_title")


def check_group(where: str, key: str, rec: Any) -> None:
    """Raise :class:`DataError` unless ``rec`` is a retrieval group (query, >= 1 positive, a negatives list)."""
    _check_object(where, key, rec)
    _nonempty_str(where, key, rec, "query")
    _check_passage_list(where, key, rec, "positives", allow_empty=False)
    _check_passage_list(where, key, rec, "negatives", allow_empty=True)
    if "lang" in rec:
        lang = rec["lang"]
        if not isinstance(lang, str) or not _LANG.match(lang):
            raise DataError(where, key, "lang", f"not a language code: {lang!r}", reason="bad_lang")


def record_language(kind: str, rec: dict[str, Any]) -> str:
    if kind == "passages":
        return str(rec["lang"])
    return str(rec.get("lang", UNDETERMINED))


# --------------------------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ShardInfo:
    name: str
    num_records: int
    sha256: str
    languages: dict[str, int]
    num_bytes: int = 0
    # groups only: the fewest negatives any record of the shard has (lets readers reject a group size early).
    min_negatives: int | None = None


@dataclass
class Manifest:
    kind: str
    format_version: int
    shards: list[ShardInfo]
    totals: dict[str, int]
    num_records: int
    source: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    # Where the shards are (not serialised; set by read_manifest / the writer): a local directory, or a URL that
    # webdataset opens (see :func:`is_url`, :meth:`shard_location`).
    root: Path | str | None = field(default=None, compare=False)

    @property
    def languages(self) -> list[str]:
        return sorted(self.totals)

    @property
    def remote(self) -> bool:
        """True when the shards are read through webdataset's opening (a URL root), not from a local directory."""
        return isinstance(self.root, str)

    def shard_path(self, shard: ShardInfo | str) -> Path:
        name = shard.name if isinstance(shard, ShardInfo) else shard
        if isinstance(self.root, str):
            raise ValueError(f"shard {name} is at a URL ({self.root}), not a local path: use shard_location")
        return (self.root or Path(".")) / name

    def shard_location(self, shard: ShardInfo | str) -> str:
        """The path or URL the shard is opened from."""
        name = shard.name if isinstance(shard, ShardInfo) else shard
        if isinstance(self.root, str):
            return _join_url(self.root, name)
        return str(self.shard_path(name))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("root")
        for s in d["shards"]:
            if s["min_negatives"] is None:
                s.pop("min_negatives")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n"

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> Manifest:
        def need(obj: Any, name: str, tp: type | tuple[type, ...], label: str) -> Any:
            if not isinstance(obj, dict) or name not in obj or not isinstance(obj[name], tp):
                raise DataError(where, None, label, f"missing or not a {tp}", reason="bad_manifest")
            return obj[name]

        kind = need(d, "kind", str, "kind")
        if kind not in _KINDS:
            raise DataError(
                where, None, "kind", f"expected one of {_KINDS}, got {kind!r}", reason="bad_manifest"
            )
        version = need(d, "format_version", int, "format_version")
        if version != FORMAT_VERSION:
            raise DataError(where, None, "format_version", f"unsupported version {version}", "bad_manifest")
        shards = []
        for i, s in enumerate(need(d, "shards", list, "shards")):
            label = f"shards[{i}]"
            langs = need(s, "languages", dict, f"{label}.languages")
            shards.append(
                ShardInfo(
                    name=need(s, "name", str, f"{label}.name"),
                    num_records=need(s, "num_records", int, f"{label}.num_records"),
                    sha256=need(s, "sha256", str, f"{label}.sha256"),
                    languages={str(k): int(v) for k, v in langs.items()},
                    num_bytes=int(s.get("num_bytes", 0)),
                    min_negatives=s.get("min_negatives"),
                )
            )
        m = cls(
            kind=kind,
            format_version=version,
            shards=shards,
            totals={str(k): int(v) for k, v in need(d, "totals", dict, "totals").items()},
            num_records=need(d, "num_records", int, "num_records"),
            source=d.get("source") or {},
            created=str(d.get("created", "")),
        )
        m.check_consistent(where)
        return m

    def check_consistent(self, where: str = "manifest") -> None:
        """The manifest's own arithmetic: per-shard language counts add up to the shard count, shards to totals."""
        totals: Counter[str] = Counter()
        names = set()
        for s in self.shards:
            # Names are joined to the shard root, which may be a ``pipe:`` shell command: letters, digits, '.',
            # '_' and '-' only, so a manifest can never inject a command (or a path outside its directory).
            if s.name in names or not _SHARD_NAME.match(s.name):
                raise DataError(
                    where,
                    None,
                    "shards.name",
                    f"duplicate shard name, or not [A-Za-z0-9._-] only: {s.name!r}",
                    "bad_manifest",
                )
            names.add(s.name)
            if sum(s.languages.values()) != s.num_records:
                raise DataError(
                    where,
                    None,
                    f"shards[{s.name}].languages",
                    f"language counts sum to {sum(s.languages.values())}, num_records is {s.num_records}",
                    reason="manifest_mismatch",
                )
            totals.update(s.languages)
        if dict(totals) != {k: v for k, v in self.totals.items() if v}:
            raise DataError(
                where,
                None,
                "totals",
                f"{self.totals} disagrees with the shards' sum {dict(totals)}",
                "manifest_mismatch",
            )
        if sum(s.num_records for s in self.shards) != self.num_records:
            raise DataError(
                where,
                None,
                "num_records",
                f"{self.num_records} disagrees with the shards' sum {sum(s.num_records for s in self.shards)}",
                reason="manifest_mismatch",
            )


# A URL webdataset opens (``http://``, ``https://``, ``file://``, ``pipe:CMD``, ``gs://``, ...) rather than a path.
_URL = re.compile(r"^(pipe:|[a-z][a-z0-9+.-]*://)")


def is_url(location: str | Path) -> bool:
    """True for a location read through webdataset's ``gopen`` (``http(s)://``, ``file://``, ``pipe:``, ...)."""
    return isinstance(location, str) and bool(_URL.match(location))


def _join_url(root: str, name: str) -> str:
    """``root`` with ``{}`` replaced by ``name`` (a template, e.g. ``pipe:aws s3 cp s3://b/dir/{} -``), else
    ``root/name``."""
    return root.replace("{}", name) if "{}" in root else root.rstrip("/") + "/" + name


def _gopen(url: str) -> Any:
    import webdataset as wds

    return wds.gopen(url, "rb")


def _read_url(url: str) -> bytes:
    f = _gopen(url)
    try:
        data = f.read()
    finally:
        f.close()  # a pipe (curl for http) raises here when the command failed
    return bytes(data)


def _manifest_url(location: str) -> tuple[str, str]:
    """(manifest URL, shard root) for a URL naming a shard directory, a ``{}`` template, or manifest.json."""
    if "{}" in location:
        return location.replace("{}", MANIFEST_NAME), location
    if location.rstrip("/").endswith("/" + MANIFEST_NAME):
        return location, location.rstrip("/")[: -len(MANIFEST_NAME) - 1]
    return _join_url(location, MANIFEST_NAME), location.rstrip("/")


def read_manifest(path: str | Path) -> Manifest:
    """Read ``<dir>/manifest.json`` (or the given manifest file) and check its internal consistency.

    ``path`` may be a URL that webdataset opens (:func:`is_url`): a directory URL (``http://host/dir``,
    ``file:///dir``), its ``manifest.json``, or a template with ``{}`` standing for the file name
    (``pipe:curl -s http://host/dir/{}``, ``pipe:aws s3 cp s3://bucket/dir/{} -``). The shards are then read from
    the same place (:func:`stream_shard`)."""
    if is_url(path):
        url, root = _manifest_url(str(path))
        try:
            raw = _read_url(url)
        except Exception as e:  # curl / pipe / file errors: the cause is in the message
            raise DataError(url, None, "manifest.json", f"cannot read the manifest ({e})", "missing") from e
        try:
            d = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(url, None, "<json>", f"not valid JSON ({e})", reason="bad_manifest") from e
        m = Manifest.from_dict(d, where=url)
        m.root = root
        return m
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.is_file():
        raise DataError(
            p, None, "manifest.json", "no manifest here (write shards with `lancer data ...`)", "missing"
        )
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(p, None, "<json>", f"not valid JSON ({e})", reason="bad_manifest") from e
    m = Manifest.from_dict(d, where=str(p))
    m.root = p.parent
    return m


# --------------------------------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------------------------------


class _OpenShard:
    def __init__(self, path: Path, name: str):
        import webdataset as wds

        self.name = name
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 (closed in finish/abort)
        # mtime/user fixed: identical records give identical bytes (and checksums).
        # (An int mtime: a float one makes tarfile add a PAX header to every member, doubling the read time.)
        self.tar = wds.TarWriter(self.file, user="lancer", group="lancer", mtime=0, encoder=False)
        self.count = 0
        self.languages: Counter[str] = Counter()
        self.min_negatives: int | None = None

    def write(self, key: str, payload: bytes, lang: str, negatives: int | None) -> None:
        self.tar.write({"__key__": key, "json": payload})
        self.count += 1
        self.languages[lang] += 1
        if negatives is not None:
            self.min_negatives = (
                negatives if self.min_negatives is None else min(self.min_negatives, negatives)
            )

    def finish(self) -> ShardInfo:
        self.tar.close()  # closes self.file too
        digest = hashlib.sha256()
        with open(self.tmp, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        size = self.tmp.stat().st_size
        os.replace(self.tmp, self.path)
        return ShardInfo(
            name=self.name,
            num_records=self.count,
            sha256=digest.hexdigest(),
            languages=dict(sorted(self.languages.items())),
            num_bytes=size,
            min_negatives=self.min_negatives,
        )

    def abort(self) -> None:
        with contextlib.suppress(Exception):
            self.tar.close()
        self.tmp.unlink(missing_ok=True)


class ShardWriter:
    """Write records into webdataset shards plus ``manifest.json``. Use as a context manager or call ``close()``.

    ``write(key, record)`` validates the record (a :class:`DataError` - a ``ValueError`` - names key and field) and
    rejects duplicate keys. ``close()`` finishes the open shards and writes the manifest last, atomically, so a
    directory with a manifest is always complete. Leaving the ``with`` block by an exception removes the partial
    shards and writes no manifest.

    ``group_by_language`` (default: True for passages) keeps one open shard per language so that every shard holds
    a single language. ``overwrite=False`` refuses a directory that already has a manifest or shards.
    """

    def __init__(
        self,
        out_dir: str | Path,
        kind: Literal["passages", "groups"],
        *,
        max_records_per_shard: int = 10000,
        source: dict | None = None,
        group_by_language: bool | None = None,
        overwrite: bool = False,
    ) -> None:
        if kind not in _KINDS:
            raise ValueError(f"ShardWriter kind: expected one of {_KINDS}, got {kind!r}")
        if max_records_per_shard < 1:
            raise ValueError(f"ShardWriter max_records_per_shard: expected >= 1, got {max_records_per_shard}")
        self.out_dir = Path(out_dir)
        self.kind = kind
        self.max_records_per_shard = max_records_per_shard
        self.source = dict(source or {})
        try:
            json.dumps(self.source)
        except (TypeError, ValueError) as e:
            raise ValueError(f"ShardWriter source: must be JSON-serialisable ({e})") from e
        self.group_by_language = (kind == "passages") if group_by_language is None else group_by_language
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = [
            p for p in self.out_dir.iterdir() if p.name == MANIFEST_NAME or p.name.startswith("shard-")
        ]
        if existing:
            if not overwrite:
                raise FileExistsError(
                    f"{self.out_dir}: already holds {MANIFEST_NAME} or shards (pass overwrite=True / --overwrite)"
                )
            for p in existing:
                p.unlink()
        self._open: dict[str, _OpenShard] = {}
        self._done: list[ShardInfo] = []
        self._next_index = 0
        self._keys: set[bytes] = set()
        self._closed = False
        self.manifest: Manifest | None = None

    def write(self, key: str, record: dict) -> None:
        if self._closed:
            raise RuntimeError(f"ShardWriter({self.out_dir}) is closed")
        where = str(self.out_dir)
        if not isinstance(key, str) or not key or _BAD_KEY.search(key):
            raise DataError(
                where, str(key), "__key__", "keys must be non-empty, without '.', '/', or whitespace"
            )
        # 16-byte digests keep the duplicate check at ~100 bytes per record for corpora of millions.
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        if digest in self._keys:
            raise DataError(where, key, "__key__", "duplicate key", reason="duplicate_key")
        if self.kind == "passages":
            check_passage(where, key, record)
            negatives = None
        else:
            check_group(where, key, record)
            negatives = len(record["negatives"])
        self._keys.add(digest)
        lang = record_language(self.kind, record)
        slot = lang if self.group_by_language else ""
        shard = self._open.get(slot)
        if shard is None:
            name = f"shard-{self._next_index:06d}.tar"
            self._next_index += 1
            shard = self._open[slot] = _OpenShard(self.out_dir / name, name)
        payload = json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8")
        shard.write(key, payload, lang, negatives)
        if shard.count >= self.max_records_per_shard:
            self._done.append(shard.finish())
            del self._open[slot]

    def close(self) -> Manifest:
        if self.manifest is not None:
            return self.manifest
        self._closed = True
        for shard in self._open.values():
            self._done.append(shard.finish())
        self._open.clear()
        shards = sorted(self._done, key=lambda s: s.name)
        totals: Counter[str] = Counter()
        for s in shards:
            totals.update(s.languages)
        manifest = Manifest(
            kind=self.kind,
            format_version=FORMAT_VERSION,
            shards=shards,
            totals=dict(sorted(totals.items())),
            num_records=sum(s.num_records for s in shards),
            source=self.source,
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            root=self.out_dir,
        )
        atomic_write_text(self.out_dir / MANIFEST_NAME, manifest.to_json())
        self.manifest = manifest
        return manifest

    def abort(self) -> None:
        """Remove everything written so far (no manifest is written)."""
        self._closed = True
        for shard in self._open.values():
            shard.abort()
        self._open.clear()
        for s in self._done:
            (self.out_dir / s.name).unlink(missing_ok=True)
        self._done.clear()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


# --------------------------------------------------------------------------------------------------------------
# Reading one shard, checked against the manifest
# --------------------------------------------------------------------------------------------------------------


def iter_shard(path: str | Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(key, record)`` from one tar shard, unchecked. Raises :class:`DataError` on a corrupt tar or JSON."""
    with open(path, "rb") as f:
        yield from _iter_tar_bytes(f, str(path))


def _fast_members(data: bytes, where: str) -> list[tuple[str, bytes]] | None:
    """Members of a plain ustar archive of regular files (what :class:`ShardWriter` writes), parsed ~10x faster
    than :mod:`tarfile`; None for anything else (PAX / GNU headers, links), which the general reader handles.
    Header checksums are verified and a missing end-of-archive block is an error, so truncation is caught."""
    out: list[tuple[str, bytes]] = []
    pos, n = 0, len(data)
    while True:
        if pos + 512 > n:
            last = out[-1][0].partition(".")[0] if out else None
            raise DataError(
                where, last, "tar", "corrupt or truncated tar: no end-of-archive block", "corrupt_tar"
            )
        hdr = data[pos : pos + 512]
        if hdr == bytes(512):
            return out
        if hdr[156:157] not in (b"0", b"\0") or hdr[257:262] != b"ustar":
            return None
        try:
            size = int(hdr[124:136].strip(b"\0 ") or b"0", 8)
            chksum = int(hdr[148:156].strip(b"\0 "), 8)
        except ValueError:
            return None
        if chksum != sum(hdr) - sum(hdr[148:156]) + 256:
            last = out[-1][0].partition(".")[0] if out else None
            raise DataError(
                where, last, "tar", f"corrupt tar: bad header checksum at byte {pos}", "corrupt_tar"
            )
        name = hdr[:100].rstrip(b"\0")
        prefix = hdr[345:500].rstrip(b"\0")
        if prefix:
            name = prefix + b"/" + name
        start = pos + 512
        if start + size > n:
            last = out[-1][0].partition(".")[0] if out else None
            raise DataError(
                where, last, "tar", "corrupt or truncated tar: member past the end", "corrupt_tar"
            )
        out.append((name.decode("utf-8"), data[start : start + size]))
        pos = start + (size + 511) // 512 * 512


def _iter_tar_bytes(fileobj: Any, where: str, keep_bad: bool = False) -> Iterator[tuple[str, Any]]:
    from webdataset.tariterators import tar_file_iterator

    if isinstance(fileobj, io.BytesIO):
        members = _fast_members(fileobj.getvalue(), where)
        if members is not None:
            for fname, payload in members:
                yield _decode_member(where, fname, payload, keep_bad)
            return

    last: str | None = None
    it = tar_file_iterator(fileobj)
    while True:
        try:
            member = next(it)
        except StopIteration:
            return
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            after = f" after record {last!r}" if last else " at the start"
            raise DataError(
                where, last, "tar", f"corrupt or truncated tar{after}: {e}", reason="corrupt_tar"
            ) from e
        key, rec = _decode_member(where, member["fname"], member["data"], keep_bad)
        last = key
        yield key, rec


def _decode_member(where: str, fname: str, payload: bytes, keep_bad: bool = False) -> tuple[str, Any]:
    key, _, ext = fname.partition(".")
    if ext != "json":
        raise DataError(where, key, fname, "unexpected tar member (expected <key>.json)", reason="bad_member")
    try:
        return key, json.loads(payload.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        reason = "bad_utf8" if isinstance(e, UnicodeDecodeError) else "bad_json"
        err = DataError(where, key, "<json>", f"not valid UTF-8 JSON ({e})", reason=reason)
        if keep_bad:
            return key, BadRecord(err)
        raise err from e


def load_shard(
    manifest: Manifest, shard: ShardInfo, *, verify_checksum: bool = True
) -> list[tuple[str, Any]]:
    """All ``(key, record)`` pairs of a shard (records not validated; see :func:`check_passage`).

    A member that is not UTF-8 JSON comes back as a :class:`BadRecord` in its place (the record checks raise its
    error, so under skipping it costs one record); the shard's structure (tar, checksum, count) is all or nothing.

    Checks, in order, each raising :class:`DataError` naming the shard: the file exists; the tar parses (a
    truncated tar names the last good key); the sha256 matches the manifest; the number of samples matches the
    manifest's ``num_records``. The whole shard is read into memory once (shards are ~10k records), which makes the
    checksum and count checks exact before any record is used. A manifest read from a URL is read through
    :func:`stream_shard` to the end, with the same checks before anything is returned.
    """
    if manifest.remote:  # a URL: streamed through webdataset, every check done before anything is returned
        return list(stream_shard(manifest, shard, verify_checksum=verify_checksum))
    path = manifest.shard_path(shard)
    where = f"{shard.name} (in {manifest.root})"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(where, None, "file", f"cannot read shard ({e})", reason="missing_shard") from e
    sha = hashlib.sha256(data).hexdigest()
    try:
        records = list(_iter_tar_bytes(io.BytesIO(data), where, keep_bad=True))
    except DataError as e:
        note = "matches" if sha == shard.sha256 else "differs from"
        raise DataError(
            where, e.key, e.field, f"{e.message} ({len(data)} bytes; sha256 {note} the manifest)", e.reason
        ) from e
    if verify_checksum and sha != shard.sha256:
        raise DataError(
            where,
            None,
            "sha256",
            f"{sha} differs from the manifest's {shard.sha256}",
            reason="checksum_mismatch",
        )
    if len(records) != shard.num_records:
        raise DataError(
            where,
            None,
            "num_records",
            f"the shard holds {len(records)} records, the manifest says {shard.num_records}",
            reason="manifest_mismatch",
        )
    return records


class _HashingReader:
    """A read-only stream that hashes and counts every byte read through it."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.sha.update(b)
        self.size += len(b)
        return bytes(b)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def stream_shard(
    manifest: Manifest, shard: ShardInfo, *, verify_checksum: bool = True
) -> Iterator[tuple[str, Any]]:
    """The ``(key, record)`` pairs of a shard, read member by member through webdataset's ``gopen`` and
    ``tar_file_iterator`` (memory: one member), from a local path or any URL webdataset opens.

    The same checks as :func:`load_shard`, each a :class:`DataError` naming the shard: the source opens and the
    tar parses (a truncated tar names the last good key) while reading; the sha256 of every byte read and the
    number of records against the manifest once the shard has been read to its end. Unlike :func:`load_shard`, a
    shard that fails a check at its end has already yielded its records (the same ones on every read, so a
    replay or resume sees the same sequence)."""
    url = manifest.shard_location(shard)
    where = f"{shard.name} (in {manifest.root})"
    try:
        f = _gopen(url)
    except Exception as e:
        raise DataError(where, None, "file", f"cannot open shard {url} ({e})", reason="missing_shard") from e
    reader = _HashingReader(f)
    count, last = 0, None
    try:
        for key, rec in _iter_tar_bytes(reader, where, keep_bad=True):  # not a BytesIO: read as a stream
            count, last = count + 1, key
            yield key, rec
        reader.drain()  # the end-of-archive padding belongs to the checksum
    except BaseException as exc:
        with contextlib.suppress(Exception):
            f.close()
        if isinstance(exc, DataError) and reader.size == 0:
            raise DataError(
                where, None, "file", f"cannot read shard {url} (no data)", "missing_shard"
            ) from exc
        raise
    try:
        f.close()
    except Exception as e:  # the pipe's command failed (e.g. curl: HTTP 404 after a partial read)
        raise DataError(where, last, "file", f"reading {url} failed ({e})", reason="missing_shard") from e
    sha = reader.sha.hexdigest()
    if verify_checksum and sha != shard.sha256:
        raise DataError(
            where, None, "sha256", f"{sha} differs from the manifest's {shard.sha256}", "checksum_mismatch"
        )
    if count != shard.num_records:
        raise DataError(
            where,
            None,
            "num_records",
            f"the shard holds {count} records, the manifest says {shard.num_records}",
            reason="manifest_mismatch",
        )


def verify_shards(manifest: Manifest) -> dict[str, int]:
    """Read every shard and check it fully against the manifest (checksums, counts, per-language counts, and each
    record's fields). Raises the first :class:`DataError`; returns ``{"shards": n, "records": n}``."""
    known = set(manifest.totals)
    n = 0
    for shard in manifest.shards:
        where = f"{shard.name} (in {manifest.root})"
        langs: Counter[str] = Counter()
        for key, rec in load_shard(manifest, shard):
            if manifest.kind == "passages":
                check_passage(where, key, rec, known)
            else:
                check_group(where, key, rec)
            langs[record_language(manifest.kind, rec)] += 1
        if dict(langs) != {k: v for k, v in shard.languages.items() if v}:
            raise DataError(
                where,
                None,
                "languages",
                f"shard holds {dict(langs)}, manifest says {shard.languages}",
                "manifest_mismatch",
            )
        n += shard.num_records
    return {"shards": len(manifest.shards), "records": n}
