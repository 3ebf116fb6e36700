"""The on-disk embedding store written by ``lancer encode`` and read by ``lancer search``.

Layout of an output directory::

    manifest.json        {"format", "complete", "model", "corpus", "corpus_bytes", "shard_size", "dtype", "dim",
                          "num_passages", "skipped_no_text",
                          "shards": [{"index", "first_line", "start", "end", "count", "rows", "attempts"}]}
    emb-00000.npy        [n, D] float16 / float32 embeddings (np.save, no pickle)
    ids-00000.json       {"ids": [...], "langs": [...], "skipped": [...]}: row i of emb-00000.npy is passage ids[i];
                         "skipped" lists the shard's passages without any text (left out, as read_beir does)

Every file is written to a temporary name and renamed into place (atomic on POSIX), and a shard counts as done only
when both of its files exist with matching row counts, so a worker killed mid-write leaves nothing half-written.
The corpus is read in shards by byte range (``plan_shards``), so no process ever holds the whole corpus text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lancer_dist.data.errors import LineFormatError
from lancer_dist.data.text import passage_text
from lancer_dist.fileio import atomic_open, atomic_write_json

__all__ = [
    "CorpusFormatError",
    "EmbeddingStore",
    "ShardPlan",
    "plan_shards",
    "read_corpus_range",
    "shard_done",
    "write_shard",
    "write_store",
]

FORMAT = "lancer-embeddings/1"


class CorpusFormatError(LineFormatError):
    """A bad line of a corpus being encoded (a :class:`~lancer_dist.data.errors.DataError`: file, line, field)."""


@dataclass(frozen=True)
class ShardPlan:
    """Passages ``[first_line, first_line + count)`` of a JSONL corpus, bytes ``[start, end)``."""

    index: int
    path: str
    start: int
    end: int
    first_line: int
    count: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_shards(corpus_path: str | Path, shard_size: int) -> list[ShardPlan]:
    """Split a BEIR ``corpus.jsonl`` into shards of ``shard_size`` non-empty lines (one pass over the bytes)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    path = str(corpus_path)
    plans: list[ShardPlan] = []
    offset = 0
    start = 0
    first_line = 1
    count = 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if line.strip():
                if count == 0:
                    start, first_line = offset, line_no
                count += 1
            offset += len(line)
            if count == shard_size:
                plans.append(ShardPlan(len(plans), path, start, offset, first_line, count))
                count = 0
    if count:
        plans.append(ShardPlan(len(plans), path, start, offset, first_line, count))
    return plans


def read_corpus_range(
    plan: ShardPlan, skipped: list[str] | None = None
) -> tuple[list[str], list[str], list[str]]:
    """(ids, texts, langs) of one shard. A passage's text is training's, :func:`lancer_dist.data.text.passage_text`
    (``title + " " + text``, BEIR's convention, with a ``"-"`` title counted as none). Passages whose text is then
    empty are left out (as ``read_beir`` does) and their ids appended to ``skipped``."""
    ids: list[str] = []
    texts: list[str] = []
    langs: list[str] = []
    with open(plan.path, "rb") as f:
        f.seek(plan.start)
        data = f.read(plan.end - plan.start)
    line_no = plan.first_line - 1
    for raw in data.splitlines():
        line_no += 1
        if not raw.strip():
            continue
        try:
            doc = json.loads(raw)
        except json.JSONDecodeError as e:
            raise CorpusFormatError(plan.path, line_no, "<line>", f"not valid JSON ({e.msg})") from None
        if not isinstance(doc, dict):
            raise CorpusFormatError(plan.path, line_no, "<line>", "expected a JSON object")
        if "_id" not in doc:
            raise CorpusFormatError(plan.path, line_no, "_id", "missing")
        if not isinstance(doc.get("text"), str):
            raise CorpusFormatError(plan.path, line_no, "text", f"expected a string, got {doc.get('text')!r}")
        if not passage_text(doc).strip():
            if skipped is not None:
                skipped.append(str(doc["_id"]))
            continue
        ids.append(str(doc["_id"]))
        texts.append(passage_text(doc))
        langs.append(str(doc.get("lang") or "und"))
    if len(ids) + (len(skipped) if skipped is not None else plan.count - len(ids)) != plan.count:
        raise CorpusFormatError(
            plan.path,
            plan.first_line,
            "<shard>",
            f"expected {plan.count} passages, read {len(ids)}: file changed?",
        )
    return ids, texts, langs


def emb_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"emb-{index:05d}.npy"


def ids_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"ids-{index:05d}.json"


def write_shard(
    out_dir: Path,
    index: int,
    ids: list[str],
    langs: list[str],
    emb_ND: np.ndarray,
    skipped: list[str] | None = None,
) -> None:
    """Embeddings first, ids last: the ids file marks the shard as done. ``skipped``: ids left out (no text)."""
    if emb_ND.shape[0] != len(ids):
        raise ValueError(f"shard {index}: {emb_ND.shape[0]} embeddings for {len(ids)} ids")
    with atomic_open(emb_path(out_dir, index), "wb") as f:
        np.save(f, emb_ND, allow_pickle=False)
    atomic_write_json(ids_path(out_dir, index), {"ids": ids, "langs": langs, "skipped": skipped or []})


def shard_done(out_dir: Path, plan: ShardPlan) -> bool:
    e, i = emb_path(out_dir, plan.index), ids_path(out_dir, plan.index)
    if not (e.is_file() and i.is_file()):
        return False
    try:
        n_emb = np.load(e, mmap_mode="r", allow_pickle=False).shape[0]
        meta = json.loads(i.read_text())
        n_ids, n_skipped = len(meta["ids"]), len(meta.get("skipped", []))
    except (ValueError, OSError, KeyError, json.JSONDecodeError):
        return False
    return n_emb == n_ids and n_ids + n_skipped == plan.count


class EmbeddingStore:
    """Read access to a complete ``lancer encode`` output directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise FileNotFoundError(f"{mf} does not exist: run `lancer encode` first")
        self.manifest: dict[str, Any] = json.loads(mf.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{mf}: field 'format' is {self.manifest.get('format')!r}, expected {FORMAT!r}")
        if not self.manifest.get("complete"):
            raise ValueError(
                f"{mf}: field 'complete' is false: the encoding job did not finish; run it again"
            )

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return int(self.manifest["num_passages"])

    def load_shard(self, index: int, mmap: bool = False) -> tuple[np.ndarray, list[str], list[str]]:
        """(emb [n, D] in the stored dtype, ids, langs) of shard ``index``."""
        emb = np.load(emb_path(self.path, index), mmap_mode="r" if mmap else None, allow_pickle=False)
        meta = json.loads(ids_path(self.path, index).read_text())
        return emb, list(meta["ids"]), list(meta["langs"])

    def all_ids(self) -> list[str]:
        """Passage ids in corpus order (position i = row i of the concatenated shards)."""
        ids: list[str] = []
        for i in range(self.num_shards):
            ids.extend(json.loads(ids_path(self.path, i).read_text())["ids"])
        return ids

    def iter_shards(self) -> Iterator[tuple[np.ndarray, list[str], list[str]]]:
        for i in range(self.num_shards):
            yield self.load_shard(i)

    def load_all(self) -> tuple[np.ndarray, list[str], list[str]]:
        """Every embedding as float32 [N, D] with ids and languages, in corpus order."""
        embs, ids, langs = [], [], []
        for e, i, lang in self.iter_shards():
            embs.append(np.asarray(e, dtype=np.float32))
            ids.extend(i)
            langs.extend(lang)
        return np.concatenate(embs) if embs else np.zeros((0, self.dim), np.float32), ids, langs


def write_store(
    out_dir: str | Path,
    emb_ND: np.ndarray,
    ids: list[str],
    langs: list[str] | None = None,
    shard_size: int = 20000,
    model: dict[str, Any] | None = None,
) -> EmbeddingStore:
    """Write in-memory embeddings as a complete store (benchmarks, tests, embeddings computed elsewhere)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = emb_ND.shape[0]
    if len(ids) != n or (langs is not None and len(langs) != n):
        raise ValueError(f"{n} embeddings but {len(ids)} ids / {len(langs or [])} langs")
    langs = langs if langs is not None else ["und"] * n
    shards = []
    for i, start in enumerate(range(0, n, shard_size)):
        end = min(n, start + shard_size)
        write_shard(out, i, ids[start:end], langs[start:end], emb_ND[start:end])
        shards.append({"index": i, "count": end - start, "rows": end - start, "attempts": 1})
    atomic_write_json(
        out / "manifest.json",
        {
            "format": FORMAT,
            "complete": True,
            "model": model or {},
            "corpus": None,
            "corpus_bytes": None,
            "shard_size": shard_size,
            "dtype": str(emb_ND.dtype),
            "dim": int(emb_ND.shape[1]),
            "num_passages": n,
            "shards": shards,
        },
    )
    return EmbeddingStore(out)
