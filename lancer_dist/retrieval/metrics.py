"""IR metrics as pure functions of (qrels, run).

Standard measures use ir-measures naming (``nDCG@10``, ``AP``, ``AP@100``, ``R@100``, ``RR@10``, ``P@5`` ...) and
are computed by ir-measures' pytrec_eval provider (trec_eval's code), except the reciprocal rank: that provider ignores
the cutoff of ``RR@k`` (it reports the uncut reciprocal rank, and with several RR cutoffs in one call it mixes their
values up), so ``RR`` and ``RR@k`` are computed here with trec_eval's ranking rule (score descending, ties broken by
docid descending) and its relevance rule (``rel`` >= 1 unless the measure says ``RR(rel=2)``). Every measure is checked
against a plain-Python textbook implementation in tests/unit/test_metrics.py. Means are over the queries of the qrels
that have at least one relevant document; a judged query missing from the run scores 0 (as ir-measures does).

XOR-Retrieve's Recall@n-kt (Asai et al., 2021) is not in any library and is computed here: a query is a hit when one
of its answer strings occurs in the first ``n`` thousand whitespace tokens of its ranked passages' concatenated
text. As in the official script, yes/no answers are ignored, queries left without answers are not counted, and the
reported overall value is the macro average over query languages (per-language values are returned too). The
official script tokenises with NLTK's ``word_tokenize``; we use whitespace tokens (documented difference).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "evaluate",
    "evaluate_by_language",
    "parse_measures",
    "per_query",
    "recall_at_kt",
    "reciprocal_rank",
    "trec_order",
]

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]


def parse_measures(names: Sequence[str]) -> list:
    """Parse ir-measures names; an unknown name raises ValueError naming it."""
    import ir_measures

    out = []
    for name in names:
        try:
            out.append(ir_measures.parse_measure(name))
        except Exception as e:  # ir_measures raises a bare exception type per parser
            raise ValueError(
                f"unknown measure {name!r} (ir-measures syntax, e.g. nDCG@10, AP@100, R@100, RR@10): {e}"
            ) from e
    return out


def _judged(qrels: Qrels) -> list[str]:
    return [q for q, docs in qrels.items() if any(r > 0 for r in docs.values())]


def per_query(qrels: Qrels, run: Run, measures: Sequence[str]) -> dict[str, dict[str, float]]:
    """measure name -> qid -> value, for every judged query (0 where the run has no result for it)."""
    import ir_measures

    parsed = parse_measures(measures)
    judged = _judged(qrels)
    out: dict[str, dict[str, float]] = {str(m): dict.fromkeys(judged, 0.0) for m in parsed}
    qrels_j = {q: dict(qrels[q]) for q in judged}
    run_j = {q: dict(run[q]) for q in judged if q in run and len(run[q]) > 0}
    rr = [m for m in parsed if m.NAME == "RR"]
    others = [m for m in parsed if m.NAME != "RR"]
    if run_j and others:
        for metric in ir_measures.pytrec_eval.iter_calc(others, qrels_j, run_j):
            out[str(metric.measure)][metric.query_id] = float(metric.value)
    for m in rr:
        cutoff = m.params.get("cutoff")
        min_rel = m.params.get("rel") or 1
        for q, docs in run_j.items():
            out[str(m)][q] = reciprocal_rank(qrels_j[q], docs, cutoff=cutoff, min_rel=min_rel)
    return out


def trec_order(scores: Mapping[str, float]) -> list[str]:
    """Docids in trec_eval's order: score descending, ties broken by docid descending."""
    return [d for d, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


def reciprocal_rank(
    qrels_q: Mapping[str, int], scores: Mapping[str, float], cutoff: int | None = None, min_rel: int = 1
) -> float:
    """1 / rank of the first document with relevance >= ``min_rel`` among the first ``cutoff`` (0 if none)."""
    ranked = trec_order(scores)
    for rank, docid in enumerate(ranked[:cutoff] if cutoff is not None else ranked, start=1):
        if qrels_q.get(docid, 0) >= min_rel:
            return 1.0 / rank
    return 0.0


def evaluate(qrels: Qrels, run: Run, measures: Sequence[str]) -> dict[str, float]:
    """Mean of each measure over the judged queries: ``{"nDCG@10": 0.41, ...}``."""
    values = per_query(qrels, run, measures)
    return {m: (sum(v.values()) / len(v) if v else math.nan) for m, v in values.items()}


def evaluate_by_language(
    qrels: Qrels, run: Run, measures: Sequence[str], query_lang: Mapping[str, str]
) -> dict[str, dict[str, float]]:
    """Per query language: ``{"all": {...}, "en": {...}, "fr": {...}}`` (queries without a language go to "und")."""
    values = per_query(qrels, run, measures)
    groups: dict[str, list[str]] = {}
    for q in _judged(qrels):
        groups.setdefault(query_lang.get(q, "und"), []).append(q)
    out = {"all": {m: (sum(v.values()) / len(v) if v else math.nan) for m, v in values.items()}}
    for lang in sorted(groups):
        qs = groups[lang]
        out[lang] = {m: sum(values[m][q] for q in qs) / len(qs) for m in values}
    return out


def _span_answers(answers: Iterable[str]) -> list[str]:
    return [a for a in answers if a not in ("yes", "no") and a != ""]


def recall_at_kt(
    ranked_docids: Mapping[str, Sequence[str]],
    passages: Mapping[str, str],
    answers: Mapping[str, Sequence[str]],
    max_tokens: int = 5000,
    query_lang: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """XOR-Retrieve Recall@kt: ``{"all": macro average over languages, "<lang>": ..., }`` (fractions in [0, 1]).

    Args:
        ranked_docids: qid -> docids, best first.
        passages: docid -> passage text (the text shown to the reader: title and body as indexed).
        answers: qid -> answer strings; queries without (non yes/no) answers are not counted.
        max_tokens: 5000 for Recall@5kt, 2000 for Recall@2kt.
        query_lang: qid -> language (default: all "und").
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    hits: dict[str, list[int]] = {}
    for qid, docids in ranked_docids.items():
        spans = _span_answers(answers.get(qid, []))
        if not spans:
            continue
        tokens: list[str] = []
        for docid in docids:
            if docid not in passages:
                raise KeyError(f"run retrieves docid {docid!r} for query {qid!r}, which is not in the corpus")
            tokens.extend(passages[docid].split())
            if len(tokens) >= max_tokens:
                break
        text = " ".join(tokens[:max_tokens])
        lang = (query_lang or {}).get(qid, "und")
        hits.setdefault(lang, []).append(int(any(a in text for a in spans)))
    # Queries with answers that the run does not cover count as misses.
    for qid, ans in answers.items():
        if qid not in ranked_docids and _span_answers(ans):
            hits.setdefault((query_lang or {}).get(qid, "und"), []).append(0)
    out = {lang: sum(h) / len(h) for lang, h in sorted(hits.items())}
    out_all = {"all": sum(out.values()) / len(out) if out else math.nan}
    return {**out_all, **out}
