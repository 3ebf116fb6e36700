"""The whole `lancer eval` on tiny random encoders over tiny hand-made multilingual collections (real Ray, FAISS,
ir-measures, concept-erasure, sklearn, MLflow): outputs exist, numbers agree with `lancer eval metrics` recomputed
from the written TREC runs, and everything lands in MLflow."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from lancer_dist.cli import main
from lancer_dist.retrieval.collections import Collection
from lancer_dist.retrieval.tiny import write_tiny_encoder

TOPICS = ["sun", "moon", "river", "stone", "bread", "wind", "fire", "tree", "star", "sea", "road", "king"]
LANG_WORDS = {"en": ["the", "and", "of"], "fr": ["le", "et", "de"], "de": ["der", "und", "von"]}


def _text(rng, topic: int, lang: str) -> str:
    # A topic word (tagged by language, like a translation) among language-specific function words.
    words = [f"{TOPICS[topic]}_{lang}"] * 2 + list(rng.choice(LANG_WORDS[lang], size=4))
    rng.shuffle(words)
    return " ".join(words)


def _collections(root):
    rng = np.random.default_rng(0)
    langs = list(LANG_WORDS)
    corpus = {
        f"p{t}-{i}-{lang}": {"text": _text(rng, t, lang), "lang": lang}
        for t in range(len(TOPICS))
        for i in range(2)
        for lang in langs
    }
    queries = {
        f"q{t}-{lang}": {"text": _text(rng, t, lang), "lang": lang} for t in range(6) for lang in langs
    }
    qrels = {q: {d: 1 for d in corpus if d.startswith(f"p{q[1:].split('-')[0]}-")} for q in queries}
    Collection(corpus, queries, qrels).write_beir(root / "coll" / "multilingual")
    en = {d: v for d, v in corpus.items() if v["lang"] == "en"}
    xq = {
        f"x{t}-{lang}": {"text": _text(rng, t, lang), "lang": lang, "answers": [f"{TOPICS[t]}_en"]}
        for t in range(6)
        for lang in ("fr", "de")
    }
    xqrels = {q: {d: 1 for d in en if d.startswith(f"p{q[1:].split('-')[0]}-")} for q in xq}
    Collection(en, xq, xqrels).write_beir(root / "coll" / "crosslingual")
    return [d["text"] for d in list(corpus.values()) + list(queries.values()) + list(xq.values())]


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, ray_env):
    root = tmp_path_factory.mktemp("eval")
    texts = _collections(root)
    base = write_tiny_encoder(root / "base", texts, seed=0)
    lancer = write_tiny_encoder(root / "lancer", texts, seed=1)
    cfg = {
        "name": "tiny-eval",
        "output_dir": str(root / "run"),
        "model": {
            "name_or_path": str(base),
            "query_prefix": "query: ",
            "passage_prefix": "passage: ",
            "max_query_length": 16,
            "max_passage_length": 16,
        },
        "tracking": {"tracking_uri": f"sqlite:///{root}/mlflow.db", "experiment": "test-eval"},
        "eval": {
            "model": str(base),
            "lancer_model": str(lancer),
            "collections": [str(root / "coll" / "multilingual"), str(root / "coll" / "crosslingual")],
            "shard_size": 25,
            "top_k": 20,
            "num_workers": 1,
            "recall_kt": [20, 8],
            "probe_per_language": 10,
            "tsne_samples": 8,
        },
    }
    (root / "eval.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_lancer_eval_end_to_end(eval_run, capsys):
    root = eval_run
    assert main(["eval", "--config", str(root / "eval.yaml"), "eval.lsar_rank=0"]) == 0
    printed = capsys.readouterr().out
    assert (
        "| method |" in printed and "base+LSAR" in printed and "base+LEACE" in printed and "lancer" in printed
    )
    out = root / "run" / "eval"
    res = json.loads((out / "results.json").read_text())
    assert set(res["results"]) == {"base", "base+LSAR", "base+LEACE", "lancer"}
    for f in ("table.md", "table.csv", "pool_growth.png", "tsne.png"):
        assert (out / f).stat().st_size > 0, f
    # Table 1: LEACE (fitted on these passages) leaves the probe near chance, the raw encoder does not.
    assert res["probe"]["base+LEACE"] < res["probe"]["base"]
    # ... each with its 95 % Wilson interval (lancer_dist.language_probe, the trainer's probe too)
    for variant, acc in res["probe"].items():
        low, high = res["probe_interval"][variant]
        assert low <= acc <= high and high - low > 0, variant
    # L_C of the probe's held-out half beside its floor: LEACE (fitted on the other half) cuts it
    lc = res["probe_erasure"]
    assert lc["base+LEACE"]["erasure_abs"] < lc["base"]["erasure_abs"]
    assert lc["base"]["erasure_over_floor"] == pytest.approx(
        lc["base"]["erasure_abs"] / lc["base"]["erasure_floor"]
    )
    # Fig. 1/3: one point per language in the pool, English first.
    assert [lang for _, lang, _ in res["pool_growth"]["base"]] == ["en", "de", "fr"]
    # Recall@kt on the collection whose queries carry answers; per-language breakdowns.
    xl = res["results"]["base"]["crosslingual"]
    assert set(xl) == {"all", "de", "fr"} and "Recall@20t" in xl["all"] and "Recall@8t" in xl["fr"]
    assert 0.0 <= xl["all"]["nDCG@10"] <= 1.0

    # The written runs re-evaluated by `lancer eval metrics` give the reported numbers.
    for variant, fname in (("base+LSAR", "base_LSAR"), ("lancer", "lancer")):
        assert (
            main(
                [
                    "eval",
                    "metrics",
                    "--qrels",
                    str(root / "coll/multilingual/qrels/test.tsv"),
                    "--run",
                    str(out / "runs" / fname / "multilingual.trec"),
                    "--measures",
                    "nDCG@10",
                    "AP@100",
                ]
            )
            == 0
        )
        got = json.loads(capsys.readouterr().out)
        want = res["results"][variant]["multilingual"]["all"]
        assert got["nDCG@10"] == pytest.approx(want["nDCG@10"], abs=1e-5)
        assert got["AP@100"] == pytest.approx(want["AP@100"], abs=1e-5)
    assert (
        main(
            [
                "eval",
                "metrics",
                "--qrels",
                str(root / "coll/crosslingual/qrels/test.tsv"),
                "--run",
                str(out / "runs" / "base" / "crosslingual.trec"),
                "--measures",
                "RR@10",
                "Recall@5kt",
                "--collection",
                str(root / "coll/crosslingual"),
            ]
        )
        == 0
    )
    got = json.loads(capsys.readouterr().out)
    assert got["all"]["RR@10"] == pytest.approx(xl["all"]["RR@10"], abs=1e-5) and "Recall@5kt" in got["fr"]

    # MLflow has the run with metrics, the table and the plots.
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["test-eval"], output_format="list")
    assert len(runs) == 1
    metrics = runs[0].data.metrics
    assert metrics["base/multilingual/all/nDCG_at_10"] == pytest.approx(
        res["results"]["base"]["multilingual"]["all"]["nDCG@10"]
    )
    assert "lancer/probe_language_id_accuracy" in metrics
    assert metrics["lancer/probe_language_id_accuracy_low"] == pytest.approx(
        res["probe_interval"]["lancer"][0]
    )
    assert metrics["lancer/probe_language_id_accuracy_high"] == pytest.approx(
        res["probe_interval"]["lancer"][1]
    )
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id, "eval")}
    assert {"eval/tsne.png", "eval/pool_growth.png", "eval/table.md", "eval/table2.json"} <= arts

    # Re-running reuses every embedding shard (nothing re-encoded).
    mtimes = sorted(p.stat().st_mtime_ns for p in (out / "emb").rglob("emb-*.npy"))
    assert (
        main(
            [
                "eval",
                "--config",
                str(root / "eval.yaml"),
                "eval.baselines=[]",
                "eval.tsne_samples=0",
                "eval.pool_growth_collection=none",
                "tracking.enabled=false",
                "eval.lancer_model=",
            ]
        )
        == 0
    )
    assert mtimes == sorted(p.stat().st_mtime_ns for p in (out / "emb").rglob("emb-*.npy"))


def test_config_errors_name_the_field(tmp_path, capsys):
    (tmp_path / "c.yaml").write_text("model: {name_or_path: x}\neval: {shard_size: 0}\n")
    assert main(["eval", "--config", str(tmp_path / "c.yaml")]) == 2
    assert "eval.shard_size" in capsys.readouterr().err
    (tmp_path / "d.yaml").write_text("model: {name_or_path: x}\n")
    assert main(["eval", "--config", str(tmp_path / "d.yaml")]) == 2
    assert "eval.collections" in capsys.readouterr().err
