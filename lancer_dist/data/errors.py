"""Errors and skip counters for bad data, and the line readers that raise them.

Every problem with input data is raised as :class:`DataError` (or a subclass: evaluation's corpus and TREC readers
raise :class:`LineFormatError`), which names where it happened (file or shard, record key, field). When a config asks
to skip bad records, the same :class:`DataError` is handed to a :class:`SkipCounter` instead: it is counted under
its reason and logged, never dropped silently. :func:`iter_jsonl` is the one JSONL reader of training sources,
evaluation collections and mining.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = [
    "BadRecord",
    "DataError",
    "LineFormatError",
    "SkipCounter",
    "decoded_lines",
    "iter_jsonl",
    "open_binary",
]

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data. ``where`` is the file or shard, ``key`` the record key (None for file-level problems),
    ``field`` the offending field (or ``"tar"``, ``"sha256"``, ``"num_records"`` for shard-level problems) and
    ``reason`` a short machine-readable category used as the skip counter name."""

    def __init__(
        self,
        where: str | Path,
        key: str | None = None,
        field: str | None = None,
        message: str | None = None,
        reason: str = "bad_record",
    ):
        self.where = str(where)
        self.key = key
        self.field = field or ""
        self.reason = reason
        self.message = message or ""
        if field is None and message is None:
            # DataError(text): re-raised from a DataLoader worker, which rebuilds exceptions from their message.
            super().__init__(self.where)
            return
        rec = f"record {key!r}" if key is not None else "(no record)"
        super().__init__(f"{self.where}: {rec} field {field!r}: {message}")


class LineFormatError(DataError):
    """A bad line of a line-oriented file (a corpus or TREC run / qrels line): record ``line N``, the field, the
    problem. ``path`` and ``line_no`` are kept for callers that point at the line."""

    def __init__(self, path: str | Path, line_no: int, field: str, problem: str, reason: str = "bad_line"):
        super().__init__(path, f"line {line_no}", field, problem, reason)
        self.path, self.line_no = str(path), line_no


@dataclass(frozen=True)
class BadRecord:
    """A record that could not be decoded (not UTF-8, not JSON; a row with the wrong number of columns), kept in its
    place - by :func:`~lancer_dist.data.shards.load_shard`, by :func:`iter_jsonl` when not ``strict`` - so that one
    bad record costs one record, not its whole file or shard. The record checks raise its ``error``."""

    error: DataError

    def get(self, _name: str, default: Any = None) -> Any:  # reads like a record without fields
        return default


class SkipCounter:
    """Counts skipped records / shards by reason (``reason`` of the :class:`DataError`) and logs the first few.

    ``counts`` maps reason -> number of skip events; ``records`` and ``shards`` are the totals the trainer reports.
    """

    def __init__(self, log_first: int = 20) -> None:
        self.counts: Counter[str] = Counter()
        self.log_first = log_first
        self._logged = 0

    def skip(self, err: DataError, *, shard_level: bool = False, n: int = 1) -> None:
        self.counts[("bad_shards." if shard_level else "bad_records.") + err.reason] += n
        self.counts["bad_shards" if shard_level else "bad_records"] += n
        if self._logged < self.log_first:
            log.warning("skipped %s: %s", "shard" if shard_level else "record", err)
            self._logged += 1
            if self._logged == self.log_first:
                log.warning("further skips are counted but not logged")

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def load(self, counts: dict[str, int]) -> None:
        self.counts = Counter({str(k): int(v) for k, v in counts.items()})


def decoded_lines(
    raw_lines: Iterable[bytes], where: str | Path, encoding: str = "utf-8"
) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` for each line of a file opened in binary mode.

    Decoding line by line (instead of opening the file in text mode) turns bytes that are not ``encoding`` into a
    :class:`DataError` naming the file, the line and the byte offset in the file, not a bare UnicodeDecodeError.
    """
    offset = 0
    for lineno, raw in enumerate(raw_lines, 1):
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError as e:
            raise DataError(
                where,
                f"line {lineno}",
                "<bytes>",
                f"not valid {encoding} at byte offset {offset + e.start} of the file "
                f"(byte {raw[e.start : e.start + 1]!r}: {e.reason})",
                "bad_encoding",
            ) from e
        offset += len(raw)
        yield lineno, text


def open_binary(path: str | Path) -> IO[bytes]:
    """``path`` opened for reading bytes (``.gz``: decompressed); a missing file is a DataError naming it."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, None, "<file>", "no such file", "missing_file")
    if p.suffix == ".gz":
        return gzip.open(p, "rb")  # type: ignore[return-value]
    return open(p, "rb")


def iter_jsonl(
    path: str | Path, encoding: str = "utf-8", *, strict: bool = True
) -> Iterator[tuple[str, Any]]:
    """``("line N", object)`` for each non-blank line of a JSONL file (``.gz`` too). Bytes that are not
    ``encoding`` raise a DataError naming file, line and byte offset. A line that is not JSON is a DataError
    (``bad_json``): raised when ``strict``, else yielded in the record's place as a :class:`BadRecord`, for a caller
    that counts and skips it. ``strict`` also requires every line to be a JSON object (``not_object``)."""
    with open_binary(path) as f:
        for n, line in decoded_lines(f, path, encoding):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                err = DataError(path, f"line {n}", "<json>", f"not valid JSON ({e})", "bad_json")
                if strict:
                    raise err from e
                yield f"line {n}", BadRecord(err)
                continue
            if strict and not isinstance(obj, dict):
                raise DataError(
                    path, f"line {n}", "<json>", f"expected an object, got {type(obj).__name__}", "not_object"
                )
            yield f"line {n}", obj
