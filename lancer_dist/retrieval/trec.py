"""TREC run and qrels files.

* run:   ``qid Q0 docid rank score tag`` (whitespace separated, one line per retrieved document)
* qrels: TREC ``qid iter docid rel`` or BEIR ``query-id<TAB>corpus-id<TAB>score`` (with a header line)

Bad lines raise :class:`TrecFormatError` naming the file, the line number and the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from lancer_dist.data.errors import LineFormatError
from lancer_dist.fileio import atomic_open

Run = dict[str, dict[str, float]]  # qid -> docid -> score
Qrels = dict[str, dict[str, int]]  # qid -> docid -> relevance

__all__ = ["Qrels", "Run", "TrecFormatError", "read_qrels", "read_run", "write_qrels", "write_run"]


class TrecFormatError(LineFormatError):
    """A bad line of a TREC run or qrels file (a :class:`~lancer_dist.data.errors.DataError`: file, line, field)."""


def write_run(path: str | Path, run: Mapping[str, Mapping[str, float]], tag: str = "lancer") -> Path:
    """Write a run atomically, each query's documents ranked by score (ties: docid ascending)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path) as f:
        for qid in run:
            ranked = sorted(run[qid].items(), key=lambda kv: (-kv[1], kv[0]))
            for rank, (docid, score) in enumerate(ranked, start=1):
                f.write(f"{qid} Q0 {docid} {rank} {score:.6f} {tag}\n")
    return path


def read_run(path: str | Path) -> Run:
    run: Run = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 6:
                raise TrecFormatError(
                    path,
                    line_no,
                    "line",
                    f"expected 6 columns 'qid Q0 docid rank score tag', got {len(parts)}",
                )
            qid, _, docid, rank, score, _ = parts
            try:
                int(rank)
            except ValueError:
                raise TrecFormatError(path, line_no, "rank", f"not an integer: {rank!r}") from None
            try:
                value = float(score)
            except ValueError:
                raise TrecFormatError(path, line_no, "score", f"not a number: {score!r}") from None
            run.setdefault(qid, {})[docid] = value
    return run


def write_qrels(path: str | Path, qrels: Mapping[str, Mapping[str, int]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for qid, docs in qrels.items():
            for docid, rel in docs.items():
                f.write(f"{qid} 0 {docid} {int(rel)}\n")
    return path


def read_qrels(path: str | Path) -> Qrels:
    """TREC qrels (4 columns) or BEIR tsv (3 columns, optional ``query-id`` header)."""
    qrels: Qrels = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            parts = line.split()
            if line_no == 1 and parts and parts[0] in ("query-id", "query_id", "qid"):
                continue  # BEIR header
            if len(parts) == 4:
                qid, _, docid, rel = parts
            elif len(parts) == 3:
                qid, docid, rel = parts
            else:
                raise TrecFormatError(
                    path,
                    line_no,
                    "line",
                    f"expected 'qid iter docid rel' or 'qid docid rel', got {len(parts)} columns",
                )
            try:
                value = int(float(rel))
            except ValueError:
                raise TrecFormatError(path, line_no, "rel", f"not a number: {rel!r}") from None
            qrels.setdefault(qid, {})[docid] = value
    return qrels
