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
    with pytest.raises(TrecFormatError, match=r"bad.trec:2: field 'score'"):
        read_run(tmp_path / "bad.trec")
