"""``lancer data mine``: hard negatives mined with a model, written as retrieval-group shards.

Flow (every step is the existing machinery; nothing here encodes or searches by itself)::

    BEIR training collection (corpus.jsonl, queries.jsonl, qrels/<split>.tsv)
      -> corpus encoded into an EmbeddingStore (EncoderPool: Ray actors; or one in-process encoder)
      -> queries encoded (same encoder, query side)
      -> exact top-``rank_max`` search of every query (search_store, total order: score desc, corpus position asc)
      -> per query: the candidates at ranks ``rank_min..rank_max`` (1-based, inclusive, counted in the full ranking,
         positives included), minus every judged positive (rel > 0) and every passage scoring above
         ``min(positive scores) - margin``; then ``num_negatives`` of them sampled (seeded per query), or all
      -> groups ``{query_id, query, positives, negatives}`` through ShardWriter (the normal groups shards).

Why the margin: a passage that the model scores almost as high as (or higher than) a judged positive is often an
unjudged positive (a false negative); NV-Retriever's "TopK-MarginPos" drops those. The positive score is that of the
query's lowest-scoring positive found in the corpus, so a passage close to *any* positive is dropped. ``margin: null``
turns the margin exclusion off (positives are always excluded).

Every query not written is counted under one reason (``no_positive_in_corpus``, ``too_few_negatives``); the counts,
the options and the number of candidates removed by each exclusion are returned and stored in the manifest's
``source``. Memory: the embeddings stay in the store's shards (memory-mapped by the search); the driver holds the
queries, their top-``rank_max`` lists and the texts of the passages it writes (read from corpus.jsonl in one pass).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MineOptions", "MineResult", "mine_hard_negatives", "select_negatives"]


@dataclass
class MineOptions:
    # Window of the ranking the negatives come from: ranks rank_min..rank_max, 1-based, inclusive.
    rank_min: int = 10
    rank_max: int = 100
    # Drop candidates scoring above min(positive scores) - margin; None: no margin exclusion.
    margin: float | None = 0.05
    # Negatives kept per query (sampled uniformly from the eligible window, seeded); None: all eligible ones.
    num_negatives: int | None = 30
    # Queries with fewer eligible negatives are not written (counted as too_few_negatives).
    min_negatives: int = 1
    seed: int = 0
    split: str = "train"
    # FAISS index_factory string for the search ("Flat": exact, the default)
    index: str = "Flat"
    shard_size: int = 20000
    batch_size: int = 64
    max_records_per_shard: int = 10000

    def __post_init__(self) -> None:
        if self.rank_min < 1 or self.rank_max < self.rank_min:
            raise ValueError(
                f"mine rank window: expected 1 <= rank_min <= rank_max, got {self.rank_min}..{self.rank_max}"
            )
        if self.margin is not None and not np.isfinite(self.margin):
            raise ValueError(f"mine margin: expected a finite number or None, got {self.margin}")
        if self.num_negatives is not None and self.num_negatives < 1:
            raise ValueError(f"mine num_negatives: expected >= 1 or None, got {self.num_negatives}")
        if self.min_negatives < 0:
            raise ValueError(f"mine min_negatives: expected >= 0, got {self.min_negatives}")


@dataclass
class MineResult:
    manifest: Any  # lancer_dist.data.shards.Manifest
    counts: dict[str, Any]


def _query_rng(seed: int, qid: str) -> np.random.Generator:
    """A generator per (seed, query): the sample of one query does not depend on the others or their order."""
    h = int.from_bytes(hashlib.blake2b(qid.encode("utf-8"), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, h])


def select_negatives(
    qid: str,
    ranked_ids: list[str],
    ranked_scores: np.ndarray,
    positive_ids: set[str],
    positive_scores: list[float],
    opts: MineOptions,
    removed: Counter[str] | None = None,
) -> list[tuple[int, str, float]]:
    """The mined negatives of one query as ``(rank, docid, score)``, best rank first.

    ``ranked_ids`` / ``ranked_scores``: the query's ranking (best first, at least up to ``rank_max`` when the corpus
    is that large). Candidates at ranks ``rank_min..rank_max`` that are positives, or score above
    ``min(positive_scores) - margin``, are removed (counted in ``removed``); ``num_negatives`` of the rest are drawn
    without replacement with a generator seeded by ``(seed, qid)``."""
    threshold = min(positive_scores) - opts.margin if opts.margin is not None and positive_scores else np.inf
    eligible: list[tuple[int, str, float]] = []
    for i in range(opts.rank_min - 1, min(opts.rank_max, len(ranked_ids))):
        docid, score = ranked_ids[i], float(ranked_scores[i])
        if docid in positive_ids:
            if removed is not None:
                removed["positive"] += 1
            continue
        if score > threshold:
            if removed is not None:
                removed["within_margin"] += 1
            continue
        eligible.append((i + 1, docid, score))
    if opts.num_negatives is not None and len(eligible) > opts.num_negatives:
        pick = _query_rng(opts.seed, qid).choice(len(eligible), opts.num_negatives, replace=False)
        eligible = [eligible[j] for j in sorted(pick.tolist())]
    return eligible


def _read_queries(path: Path) -> dict[str, dict[str, Any]]:
    from lancer_dist.data.errors import iter_jsonl
    from lancer_dist.retrieval.collections import _id, _req

    out: dict[str, dict[str, Any]] = {}
    for key, obj in iter_jsonl(path):
        qid = _id(str(path), key, _req(str(path), key, obj, "_id"), "_id")
        text = _req(str(path), key, obj, "text")
        if not isinstance(text, str) or not text.strip():
            from lancer_dist.data.errors import DataError

            raise DataError(path, key, "text", "missing, empty or not a string", "bad_text")
        out[qid] = {"text": text, "lang": obj.get("lang")}
    return out


def _corpus_passages(corpus: Path, wanted: set[str]) -> dict[str, dict[str, str]]:
    """``{docid: {"docid", "text", "title"}}`` for the wanted ids, in one pass over corpus.jsonl."""
    from lancer_dist.data.errors import iter_jsonl

    out: dict[str, dict[str, str]] = {}
    for _, obj in iter_jsonl(corpus):
        did = str(obj.get("_id"))
        if did in wanted:
            out[did] = {
                "docid": did,
                "text": str(obj.get("text") or ""),
                "title": str(obj.get("title") or ""),
            }
    return out


def _passage(p: dict[str, str]) -> dict[str, str]:
    # The encoder read "title text"; a passage without text but with a title keeps the title as its text.
    return p if p["text"].strip() else {**p, "text": p["title"]}


def mine_hard_negatives(
    spec: Any,
    collection: str | Path,
    out_dir: str | Path,
    opts: MineOptions,
    *,
    emb_dir: str | Path | None = None,
    pool: Any = None,
    encoder: Any = None,
    overwrite: bool = False,
    progress: bool = False,
) -> MineResult:
    """Mine hard negatives for the ``opts.split`` queries of a BEIR ``collection`` with the encoder ``spec`` and
    write them as groups shards to ``out_dir``.

    Encoding: with ``pool`` (an :class:`EncoderPool`: Ray actors) the corpus and queries are encoded by it;
    otherwise in this process (``encoder``: an already loaded encoder, else ``load_encoder(spec)``). The store goes
    to ``emb_dir`` (default ``<out_dir>/embeddings``; reused when complete, as ``lancer encode`` does)."""
    from lancer_dist.data.shards import ShardWriter
    from lancer_dist.retrieval.encode import encode_corpus_local
    from lancer_dist.retrieval.encoder_io import load_encoder
    from lancer_dist.retrieval.search import search_store
    from lancer_dist.retrieval.store import EmbeddingStore, emb_path, ids_path
    from lancer_dist.retrieval.trec import read_qrels

    root = Path(collection)
    corpus = root / "corpus.jsonl"
    out = Path(out_dir)
    if (out / "manifest.json").exists() and not overwrite:  # before the (long) encoding, not after it
        raise FileExistsError(f"{out}: already holds manifest.json (pass overwrite=True / --overwrite)")
    queries = _read_queries(root / "queries.jsonl")
    qrels = read_qrels(root / "qrels" / f"{opts.split}.tsv")
    counts: Counter[str] = Counter()
    positives: dict[str, set[str]] = {}
    for qid, docs in qrels.items():
        pos = {d for d, rel in docs.items() if rel > 0}
        if qid not in queries:
            counts["qrels_query_not_in_queries"] += 1
        elif pos:
            positives[qid] = pos
    qids = [q for q in queries if q in positives]
    counts["queries_without_positive_judgment"] = len(queries) - len(qids)
    if not qids:
        raise ValueError(
            f"{root}: no query of queries.jsonl has a positive judgment in qrels/{opts.split}.tsv"
        )

    emb = Path(emb_dir) if emb_dir is not None else out / "embeddings"
    kw: dict[str, Any] = {"shard_size": opts.shard_size, "batch_size": opts.batch_size, "progress": progress}
    texts = [queries[q]["text"] for q in qids]
    if pool is not None:
        pool.encode_corpus(corpus, emb, **kw)
        q_QD = pool.encode_texts(texts, is_query=True, batch_size=opts.batch_size)
    else:
        enc = encoder if encoder is not None else load_encoder(spec)
        encode_corpus_local(spec, corpus, emb, encoder=enc, **kw)
        q_QD = enc.encode(texts, is_query=True, batch_size=opts.batch_size)
    store = EmbeddingStore(emb)
    res = search_store(emb, q_QD, opts.rank_max, opts.index, parallel="threads")

    # The positives' own scores (for the margin), from their stored embeddings: one shard at a time, memory-mapped.
    row_of: dict[str, tuple[int, int]] = {}
    wanted_pos = set().union(*positives.values())
    for s in range(store.num_shards):
        ids = json.loads(ids_path(store.path, s).read_text())["ids"]
        for r, d in enumerate(ids):
            if d in wanted_pos:
                row_of[d] = (s, r)
    pos_scores: dict[str, list[float]] = {}
    q_index = {q: i for i, q in enumerate(qids)}
    for s in range(store.num_shards):
        mm = np.load(emb_path(store.path, s), mmap_mode="r", allow_pickle=False)
        for qid in qids:
            for d in positives[qid]:
                if row_of.get(d, (-1, -1))[0] == s:
                    v = np.asarray(mm[row_of[d][1]], dtype=np.float32)
                    pos_scores.setdefault(qid, []).append(float(q_QD[q_index[qid]] @ v))
        del mm

    removed: Counter[str] = Counter()
    mined: dict[str, list[tuple[int, str, float]]] = {}
    for i, qid in enumerate(qids):
        if qid not in pos_scores:  # no positive of this query is in the (encoded) corpus
            counts["no_positive_in_corpus"] += 1
            continue
        negs = select_negatives(
            qid, res.docids[i], res.scores[i], positives[qid], pos_scores[qid], opts, removed
        )
        if len(negs) < opts.min_negatives:
            counts["too_few_negatives"] += 1
            continue
        mined[qid] = negs

    needed = {d for q in mined for d in positives[q]} | {d for n in mined.values() for _, d, _ in n}
    passages = _corpus_passages(corpus, needed)
    source = {
        "kind": "groups",
        "mined": {
            "collection": str(root),
            "model": spec.to_dict() if hasattr(spec, "to_dict") else str(spec),
            "embeddings": str(emb),
            "options": asdict(opts),
        },
    }
    written = 0
    with ShardWriter(
        out, "groups", max_records_per_shard=opts.max_records_per_shard, source=source, overwrite=overwrite
    ) as writer:
        for qid, negs in mined.items():
            pos_list = [
                _passage(passages[d]) for d in sorted(positives[qid]) if d in passages and d in row_of
            ]
            rec: dict[str, Any] = {
                "query_id": qid,
                "query": queries[qid]["text"],
                "positives": pos_list,
                "negatives": [
                    {**_passage(passages[d]), "rank": rank, "score": round(score, 6)}
                    for rank, d, score in negs
                ],
            }
            lang = queries[qid].get("lang")
            if isinstance(lang, str) and lang:
                rec["lang"] = lang
            writer.write(f"g{written:09d}", rec)
            written += 1
        summary = {
            "written": written,
            "negatives": sum(len(n) for n in mined.values()),
            "removed_from_window": dict(removed),
            "skipped": {k: v for k, v in counts.items() if v},
        }
        writer.source["counts"] = summary
    assert writer.manifest is not None
    return MineResult(writer.manifest, summary)
