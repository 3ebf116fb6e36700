"""Metrics on hand-made cases: values computed by hand, and against ir-measures' own aggregate."""

from __future__ import annotations

import math

import pytest

from lancer_dist.retrieval.metrics import evaluate, evaluate_by_language, per_query, recall_at_kt
from lancer_dist.retrieval.trec import TrecFormatError, read_qrels, read_run, write_qrels, write_run

QRELS = {"q1": {"d1": 1, "d3": 1, "d9": 0}, "q2": {"d5": 2, "d6": 1}, "q3": {"d8": 1}}
RUN = {
    "q1": {"d1": 0.9, "d2": 0.8, "d3": 0.7, "d4": 0.6},
    "q2": {"d6": 1.0, "d7": 0.5, "d5": 0.4},
    # q3 retrieved nothing: it scores 0 on every measure
}

# By hand (trec_eval conventions: linear gains, log2(rank + 1) discounts).
NDCG_Q1 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
NDCG_Q2 = (1 + 2 / math.log2(4)) / (2 + 1 / math.log2(3))
AP_Q1 = (1 / 1 + 2 / 3) / 2
AP_Q2 = (1 / 1 + 2 / 3) / 2


def test_hand_computed_values():
    got = evaluate(QRELS, RUN, ["nDCG@10", "AP", "RR@10", "R@2", "P@2"])
    assert got["nDCG@10"] == pytest.approx((NDCG_Q1 + NDCG_Q2 + 0) / 3, abs=1e-9)
    assert got["AP"] == pytest.approx((AP_Q1 + AP_Q2) / 3, abs=1e-9)
    assert got["RR@10"] == pytest.approx((1 + 1 + 0) / 3)
    assert got["R@2"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert got["P@2"] == pytest.approx((0.5 + 0.5 + 0) / 3)


def test_matches_ir_measures_aggregate():
    import ir_measures

    names = ["nDCG@10", "AP@100", "R@100", "RR@10", "AP"]
    ours = evaluate(QRELS, RUN, names)
    ref = ir_measures.calc_aggregate([ir_measures.parse_measure(n) for n in names], QRELS, RUN)
    for n in names:
        assert ours[n] == pytest.approx(ref[ir_measures.parse_measure(n)], abs=1e-12), n


def test_per_query_and_language_breakdown():
    pq = per_query(QRELS, RUN, ["nDCG@10"])["nDCG@10"]
    assert pq == pytest.approx({"q1": NDCG_Q1, "q2": NDCG_Q2, "q3": 0.0})
    by = evaluate_by_language(QRELS, RUN, ["nDCG@10"], {"q1": "en", "q2": "fr", "q3": "fr"})
    assert by["en"]["nDCG@10"] == pytest.approx(NDCG_Q1)
    assert by["fr"]["nDCG@10"] == pytest.approx(NDCG_Q2 / 2)
    assert by["all"]["nDCG@10"] == pytest.approx((NDCG_Q1 + NDCG_Q2) / 3)


def test_unknown_measure_is_named():
    with pytest.raises(ValueError, match="nDGC@10"):
        evaluate(QRELS, RUN, ["nDGC@10"])


def test_recall_at_kt_hand_made():
    passages = {"p1": "alpha beta gamma", "p2": "delta the answer", "p3": "noise words here"}
    ranked = {"q1": ["p1", "p2"], "q2": ["p3", "p1"], "q3": ["p1"], "q4": ["p2", "p1"]}
    answers = {
        "q1": ["the answer"],  # tokens 5-6 of "alpha beta gamma delta the answer"
        "q2": ["gamma"],  # token 6 of "noise words here alpha beta gamma"
        "q3": ["yes"],  # yes/no answers are skipped: q3 not counted
        "q4": ["answer alpha"],  # spans the boundary between two passages
        "q5": ["alpha"],  # not in the run: a miss
    }
    lang = {"q1": "fi", "q2": "fi", "q3": "fi", "q4": "ja", "q5": "ja"}
    r6 = recall_at_kt(ranked, passages, answers, max_tokens=6, query_lang=lang)
    assert r6 == {"all": pytest.approx((1.0 + 0.5) / 2), "fi": 1.0, "ja": 0.5}
    r5 = recall_at_kt(ranked, passages, answers, max_tokens=5, query_lang=lang)
    # q1: "alpha beta gamma delta the" misses; q2: "noise words here alpha beta" misses; q4 still hits.
    assert r5 == {"all": pytest.approx((0.0 + 0.5) / 2), "fi": 0.0, "ja": 0.5}
    with pytest.raises(KeyError, match="p404"):
        recall_at_kt({"q1": ["p404"]}, passages, answers)


def test_trec_roundtrip_and_errors(tmp_path):
    write_run(tmp_path / "run.trec", RUN)
    assert read_run(tmp_path / "run.trec") == RUN  # scores have <= 6 decimals
    lines = (tmp_path / "run.trec").read_text().splitlines()
    assert lines[0].split()[:4] == ["q1", "Q0", "d1", "1"]
    write_qrels(tmp_path / "qrels.txt", QRELS)
    assert read_qrels(tmp_path / "qrels.txt") == QRELS
    (tmp_path / "beir.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t1\n")
    assert read_qrels(tmp_path / "beir.tsv") == {"q1": {"d1": 1}}
    (tmp_path / "bad.trec").write_text("q1 Q0 d1 1 0.5 x\nq1 Q0 d2 2 high x\n")
    with pytest.raises(TrecFormatError, match=r"bad.trec: record 'line 2' field 'score'"):
        read_run(tmp_path / "bad.trec")


# --- Every reported measure against a plain-Python textbook reference (trec_eval definitions) ------------------------


def _ref_order(run_q):
    # trec_eval ranks by score descending and breaks ties by docid descending.
    return [d for d, _ in sorted(run_q.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


def _ref_measure(qrels_q, run_q, name):
    ranked = _ref_order(run_q)
    rel = {d: r for d, r in qrels_q.items() if r > 0}  # unjudged and rel-0 documents gain nothing
    base, _, k_s = name.partition("@")
    k = int(k_s) if k_s else None
    top = ranked[:k] if k else ranked
    if base == "nDCG":
        dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(top))
        ideal = sorted(rel.values(), reverse=True)[:k] if k else sorted(rel.values(), reverse=True)
        return dcg / sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    if base == "AP":  # map / map_cut: divided by every relevant document, retrieved or not
        hits, total = 0, 0.0
        for i, d in enumerate(top):
            if d in rel:
                hits += 1
                total += hits / (i + 1)
        return total / len(rel)
    if base == "R":
        return sum(d in rel for d in top) / len(rel)
    if base == "P":
        return sum(d in rel for d in top) / k
    if base == "RR":
        return next((1 / (i + 1) for i, d in enumerate(top) if d in rel), 0.0)
    raise KeyError(name)


ALL_MEASURES = [
    "nDCG@10",
    "nDCG@3",
    "nDCG",
    "AP",
    "AP@100",
    "AP@5",
    "R@100",
    "R@5",
    "RR@10",
    "RR@3",
    "RR",
    "P@5",
    "P@10",
]


def test_first_relevant_past_cutoff():
    """The issue's case: the only relevant document retrieved is at rank 19; RR@10 must be 0, RR 1/19."""
    qrels = {"q1": {"d1": 1, "d19": 1}}
    run = {"q1": {f"d{i}": 100.0 - i for i in range(2, 40)}}  # d2..d39: d19 is 18th
    run["q1"]["d0"] = 1000.0  # d0 unjudged at rank 1, so d19 sits at rank 19
    got = evaluate(qrels, run, ["RR@10", "RR@5", "RR", "nDCG@10", "R@100"])
    assert got["RR@10"] == 0.0
    assert got["RR@5"] == 0.0
    assert got["RR"] == pytest.approx(1 / 19)
    assert got["nDCG@10"] == 0.0
    assert got["R@100"] == pytest.approx(0.5)
    # Each alone as well (the provider's bug depended on which measures came in the same call).
    assert evaluate(qrels, run, ["RR@10"])["RR@10"] == 0.0


@pytest.mark.parametrize("combo", [ALL_MEASURES, *[[m] for m in ALL_MEASURES], ["RR@10", "RR@3"]])
def test_every_measure_matches_textbook_reference(combo):
    """Random runs with score ties, unjudged documents, graded relevance and relevant documents past every cutoff."""
    import random

    rng = random.Random(0)
    qrels, run = {}, {}
    for qi in range(60):
        q = f"q{qi}"
        docs = [f"d{j}" for j in range(40)]
        qrels[q] = {d: rng.choice([0, 0, 1, 2]) for d in rng.sample(docs, 8)}
        if not any(v > 0 for v in qrels[q].values()):
            qrels[q][docs[0]] = 1
        # Integer scores from a small range: many ties; 5-30 of 40 documents retrieved, most of them unjudged.
        run[q] = {d: float(rng.randint(0, 12)) for d in rng.sample(docs, rng.randint(5, 30))}
    past_cutoff = [q for q in qrels if _ref_measure(qrels[q], run[q], "RR") < 1 / 10]
    assert len(past_cutoff) >= 5  # the case the issue is about is well represented
    pq = per_query(qrels, run, combo)
    for name in combo:
        for q in qrels:
            assert pq[name][q] == pytest.approx(_ref_measure(qrels[q], run[q], name), abs=1e-12), (name, q)
