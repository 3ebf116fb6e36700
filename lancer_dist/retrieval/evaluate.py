"""``lancer eval``: encode + search + metrics for a model over BEIR collections, with the post-hoc baselines and the
language-bias analyses, reported side by side as the paper's Table 2 (+ Table 1 probe accuracy) and logged to MLflow.

Stages, each a function from small typed artefacts to one (``run_eval`` composes them and logs each stage's metrics)::

    plan_eval       cfg -> EvalPlan (collections, the analyses' collections, encoder directories)
    encode_stage    EncoderPool (Ray actors, model loaded once) per model -> Encoded (each collection's corpus in an
                    EmbeddingStore, sharded and resumable; its queries in memory)
    fit_baselines   baseline embeddings of eval.posthoc_collection -> LSAR / LEACE -> list[Variant]
    search_stage    per variant (base, +LSAR, +LEACE, LANCER): sharded FAISS search (Ray) -> TREC run -> metrics per
                    language -> Retrieval
    analyses_stage  language-ID probe (Table 1), nDCG@10 as languages join the pool (Fig. 1/3), t-SNE (Fig. 5)
                    -> Analyses
    report_stage    Table 2 (+ Table 1 column), results.json -> EvalReport

Outputs under ``eval.output_dir``: ``emb/<model>/<collection>/`` (embedding stores, reused on re-runs),
``runs/<variant>/<collection>.trec``, ``results.json``, ``table.md`` / ``table.csv``, ``pool_growth.png``, ``tsne.png``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lancer_dist.config import ConfigError, EvalConfig, RunConfig, config_to_dict
from lancer_dist.language_probe import fit_language_probe, population_erasure
from lancer_dist.retrieval.analysis import (
    balanced_sample,
    plot_pool_growth,
    pool_growth,
    tsne_plot,
)
from lancer_dist.retrieval.encode import EncoderPool
from lancer_dist.retrieval.encoder_io import EncoderSpec
from lancer_dist.retrieval.metrics import evaluate_by_language, recall_at_kt
from lancer_dist.retrieval.posthoc import Affine, fit_leace, fit_lsar
from lancer_dist.retrieval.search import SearchResult, search_store, topk_recall
from lancer_dist.retrieval.store import EmbeddingStore, plan_shards, read_corpus_range
from lancer_dist.retrieval.trec import write_run
from lancer_dist.tracking import Tracker, resolve_tracking_uri

_log = logging.getLogger(__name__)

__all__ = ["EvalCollection", "EvalReport", "format_table", "load_eval_collection", "metric_key", "run_eval"]


def metric_key(*parts: str) -> str:
    """An MLflow-safe metric name: ``metric_key("base", "crosslingual", "nDCG@10")`` -> ``base/crosslingual/nDCG_at_10``.

    MLflow allows letters, digits, ``_ - . / :`` and spaces, and no empty, ``.`` or ``..`` path parts: ``@`` and
    ``+`` are spelled out, every other character becomes ``_``, and empty / dot parts are dropped."""
    out: list[str] = []
    for part in parts:
        for piece in str(part).replace("@", "_at_").replace("+", "plus_").split("/"):
            piece = re.sub(r"[^A-Za-z0-9_\-. ]", "_", piece).strip()
            if piece and piece not in (".", ".."):
                out.append(piece)
    return "/".join(out)


@dataclass
class EvalCollection:
    """Queries and judgments of a BEIR directory (the corpus is streamed from disk by the encoder)."""

    name: str
    path: Path
    qids: list[str]
    query_texts: list[str]
    query_langs: list[str]
    answers: dict[str, list[str]]
    qrels: dict[str, dict[str, int]]

    @property
    def corpus(self) -> Path:
        return self.path / "corpus.jsonl"


def load_eval_collection(path: str | Path, name: str | None = None, split: str = "test") -> EvalCollection:
    """Queries, judgments and answers of a BEIR directory, read with :func:`lancer_dist.retrieval.collections.read_beir`
    (bad records raise a ``DataError`` naming file, line and field; dangling judgments are counted and dropped).

    Queries without any judgment are dropped (they cannot be scored); the corpus is not kept (the encoder streams it).
    """
    from lancer_dist.retrieval.collections import read_beir

    d = Path(path)
    coll = read_beir(d, split=split)
    qids = [q for q in coll.queries if q in coll.qrels]
    if not qids:
        raise ValueError(f"collection {d}: no query of queries.jsonl has judgments in qrels/{split}.tsv")
    answers = {
        q: [str(a) for a in coll.queries[q]["answers"]] for q in qids if coll.queries[q].get("answers")
    }
    if coll.skipped:
        _log.warning("%s: skipped %s", d, dict(coll.skipped))
    return EvalCollection(
        name or d.name,
        d,
        qids,
        [str(coll.queries[q]["text"]) for q in qids],
        [str(coll.queries[q].get("lang") or "und") for q in qids],
        answers,
        {q: coll.qrels[q] for q in qids},
    )


def _collection_names(paths: list[Path]) -> list[str]:
    """Short unique names: the path below the collections' common parent (e.g. ``monolingual/fr``).

    A name is a relative path of plain parts (letters, digits, ``_ - .``), never absolute and never ``..``: it is
    used below the eval output directory (``emb/<model>/<name>``) and in MLflow metric names. A collection listed
    twice is a :class:`ConfigError` naming both positions in ``eval.collections``."""
    resolved = [p.resolve() for p in paths]
    first: dict[Path, int] = {}
    for i, r in enumerate(resolved):
        if r in first:
            raise ConfigError(
                "eval.collections",
                [str(p) for p in paths],
                f"distinct collection directories (entries {first[r]} and {i} are both {r})",
            )
        first[r] = i
    if len(paths) == 1:
        raw = [resolved[0].name]
    else:
        common = Path(*_common_prefix([r.parts for r in resolved]))
        raw = [str(r.relative_to(common)) if r != common else r.name for r in resolved]
    names = [metric_key(n) or "collection" for n in raw]
    # Equal names: a collection nested in another one, or names that are equal once sanitised.
    if len(set(names)) != len(names):
        names = [f"{n}-{i}" for i, n in enumerate(names)]
    return names


def _common_prefix(parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    out: list[str] = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        out.append(items[0])
    return tuple(out)


def _model_dir(path: str, field_name: str, revision: str | None = None, cache_dir: str | None = None) -> Path:
    """An encoder directory named by a config field: a local directory, or a hub id resolved to its snapshot; a
    missing one is a ConfigError naming that field."""
    from lancer_dist.model.hub import resolve_model_dir

    return resolve_model_dir(path, field_name, revision=revision, cache_dir=cache_dir)


def resolve_base_model(cfg: RunConfig, out_dir: Path) -> Path:
    """The baseline encoder directory: eval.model, model.name_or_path, or a random backbone saved once."""
    if cfg.eval.model:
        return _model_dir(cfg.eval.model, "eval.model", cfg.eval.model_revision, cfg.model.cache_dir)
    if cfg.model.backbone_config is None:
        return _model_dir(
            cfg.model.name_or_path, "model.name_or_path", cfg.model.revision, cfg.model.cache_dir
        )
    import torch

    from lancer_dist.model import BiEncoder, load_tokenizer

    target = out_dir / "models" / f"random-seed{cfg.train.seed}"
    if not (target / "lancer_encoder.json").is_file():
        torch.manual_seed(cfg.train.seed)
        BiEncoder.from_config(cfg.model).save_pretrained(target, load_tokenizer(cfg.model))
    return target


@dataclass
class EvalReport:
    output_dir: Path
    # variant -> collection -> {"all": {measure: value}, "<lang>": {...}} (+ "Recall@5kt" style entries)
    results: dict[str, dict[str, dict[str, dict[str, float]]]] = field(default_factory=dict)
    probe: dict[str, float] = field(default_factory=dict)  # variant -> language-ID accuracy
    # variant -> the accuracy's 95 % Wilson interval (lancer_dist.language_probe)
    probe_interval: dict[str, tuple[float, float]] = field(default_factory=dict)
    # variant -> {"erasure_abs", "erasure_floor", "erasure_over_floor"} on the probe's held-out half
    probe_erasure: dict[str, dict[str, float]] = field(default_factory=dict)
    pool_growth: dict[str, list[tuple[int, str, float]]] = field(default_factory=dict)
    table: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    # variant -> collection -> recall@top_k of the approximate index against exact search (approximate indexes only)
    index_recall: dict[str, dict[str, float]] = field(default_factory=dict)


def _sample_store(store: EmbeddingStore, per_language: int, seed: int) -> tuple[np.ndarray, list[str]]:
    emb, _, langs = store.load_all()
    idx = balanced_sample(langs, per_language, seed)
    return emb[idx], [langs[i] for i in idx]


def _corpus_texts(coll: EvalCollection) -> dict[str, str]:
    texts: dict[str, str] = {}
    for plan in plan_shards(coll.corpus, 100000):
        ids, tx, _ = read_corpus_range(plan)
        texts.update(zip(ids, tx))
    return texts


def index_recall(
    store_path: Path, q_QD: np.ndarray, sr: SearchResult, ev: Any, transform: Affine | None
) -> float | None:
    """Recall@top_k of an approximate index's results against exact search on a sample of
    ``eval.index.recall_queries`` queries (None for exact indexes, or when switched off)."""
    spec = ev.index_spec()
    if (isinstance(spec, str) and spec == "Flat") or (not isinstance(spec, str) and spec.kind == "flat"):
        return None
    n = min(len(q_QD), ev.index.recall_queries)
    if n == 0:
        return None
    rows = np.sort(np.random.default_rng(ev.seed).choice(len(q_QD), n, replace=False))
    exact = search_store(
        store_path,
        q_QD[rows],
        ev.top_k,
        "Flat",
        transform=transform,
        **ev.search_options(),
    )
    return topk_recall(sr.positions[rows], exact.positions)


RATIO_COLUMNS = frozenset({"L_C / floor"})  # ratios, not fractions: printed as they are


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table: fractions (metrics, probe accuracy) as percentages with one decimal, like the paper;
    ratios (:data:`RATIO_COLUMNS`) with two decimals as they are."""
    if not rows:
        return ""
    cols = list(rows[0])

    def fmt(col: str, v: Any) -> str:
        if not isinstance(v, float):
            return str(v)
        return f"{v:.2f}" if col in RATIO_COLUMNS else f"{100 * v:.1f}"

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(c, r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# Stages: plan -> encode -> fit post-hoc baselines -> search + metrics -> analyses -> report. Each takes and returns
# a small typed artefact; run_eval composes them. Stages do not talk to MLflow: each artefact says which metrics it
# holds, and run_eval hands them to the tracker as soon as the stage is done.
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalPlan:
    """What one evaluation reads and writes, resolved from ``cfg.eval``."""

    out: Path  # the eval output directory
    colls: list[EvalCollection]  # the collections scored (eval.collections)
    probe_coll: EvalCollection  # the language-ID probe and t-SNE sample
    posthoc_coll: EvalCollection  # the post-hoc baselines' fitting sample
    growth_coll: EvalCollection | None  # pool growth (None: switched off, or fewer than two query languages)
    models: dict[str, Path]  # model tag ("base", "lancer") -> encoder directory

    @property
    def all_colls(self) -> list[EvalCollection]:
        """Every collection that is encoded: the scored ones, then the analyses' extra ones."""
        extra = {id(x): x for x in (self.probe_coll, self.posthoc_coll, self.growth_coll)}.values()
        return list(self.colls) + [c for c in extra if c is not None and c not in self.colls]


def plan_eval(cfg: RunConfig) -> EvalPlan:
    """Read the collections' queries and judgments, pick the analyses' collections, resolve the encoders; creates the
    eval output directory. A bad setting is a :class:`ConfigError` naming its field."""
    ev = cfg.eval
    if not ev.collections:
        raise ConfigError(
            "eval.collections", ev.collections, "a non-empty list of BEIR collection directories"
        )
    out = Path(ev.output_dir or Path(cfg.output_dir) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    paths = [Path(p) for p in ev.collections]
    colls = [load_eval_collection(p, n) for p, n in zip(paths, _collection_names(paths))]
    by_path = {c.path.resolve(): c for c in colls}

    def extra(path_str: str) -> EvalCollection:
        p = Path(path_str)
        return by_path.get(p.resolve()) or load_eval_collection(p, metric_key(f"extra-{p.resolve().name}"))

    n_langs = lambda c: len(set(c.query_langs))  # noqa: E731
    probe_coll = (
        extra(ev.probe_collection) if ev.probe_collection else max(colls, key=lambda c: _corpus_lang_count(c))
    )
    posthoc_coll = extra(ev.posthoc_collection) if ev.posthoc_collection else probe_coll
    growth_coll: EvalCollection | None = None
    if ev.pool_growth_collection != "none":
        growth_coll = (
            extra(ev.pool_growth_collection) if ev.pool_growth_collection else max(colls, key=n_langs)
        )
        if n_langs(growth_coll) < 2:
            growth_coll = None

    models = {"base": resolve_base_model(cfg, out)}
    if ev.lancer_model:
        models["lancer"] = _model_dir(ev.lancer_model, "eval.lancer_model")
    plan = EvalPlan(out, colls, probe_coll, posthoc_coll, growth_coll, models)
    for tag in models:
        for c in plan.all_colls:  # every output stays below the eval output directory
            if not (out / "emb" / tag / c.name).resolve().is_relative_to(out.resolve()):
                raise ConfigError(
                    "eval.collections", str(c.path), f"a collection whose name {c.name!r} is relative"
                )
    return plan


@dataclass
class Encoded:
    """Every model's embeddings of every collection: passages in sharded stores on disk, queries in memory."""

    stores: dict[tuple[str, str], EmbeddingStore] = field(default_factory=dict)  # (model tag, collection) ->
    queries: dict[tuple[str, str], np.ndarray] = field(
        default_factory=dict
    )  # (model tag, collection) -> [Q, D]
    seconds: dict[str, float] = field(default_factory=dict)  # "encode/<tag>" -> wall time


def encode_stage(cfg: RunConfig, plan: EvalPlan, progress: bool, log: Callable[[str], None]) -> Encoded:
    """Encode every collection's corpus (into ``emb/<model>/<collection>/``, reused on re-runs) and queries with
    each model, through one Ray actor pool per model."""
    ev = cfg.eval
    enc = Encoded()
    for tag, path in plan.models.items():
        t0 = time.perf_counter()
        spec = EncoderSpec.from_model_config(str(path), cfg.model)
        with EncoderPool(
            spec,
            num_workers=ev.num_workers,
            cpus_per_worker=ev.cpus_per_worker,
            ray_address=ev.ray_address,
            start_timeout_s=ev.worker_start_timeout_s,
        ) as pool:
            for c in plan.all_colls:
                log(f"[eval] encoding {c.name} with {tag} ({path})")
                res = pool.encode_corpus(
                    c.corpus,
                    plan.out / "emb" / tag / c.name,
                    shard_size=ev.shard_size,
                    dtype=ev.dtype,
                    batch_size=ev.batch_size,
                    progress=progress,
                )
                enc.stores[tag, c.name] = EmbeddingStore(res.out_dir)
                enc.queries[tag, c.name] = pool.encode_texts(
                    c.query_texts, is_query=True, batch_size=ev.batch_size
                )
        enc.seconds[f"encode/{tag}"] = time.perf_counter() - t0
    return enc


@dataclass(frozen=True)
class Variant:
    """One row of Table 2: a model's embeddings, optionally through a post-hoc eraser."""

    name: str  # "base", "base+LSAR", "base+LEACE", "lancer"
    model: str  # the model tag whose embeddings it uses
    transform: Affine | None = None


def fit_baselines(ev: EvalConfig, plan: EvalPlan, enc: Encoded) -> list[Variant]:
    """The variants to score: the baseline, each post-hoc baseline fitted on the baseline's embeddings of
    multilingual passages with language labels (``eval.posthoc_collection``), and the LANCER model."""
    variants = [Variant("base", "base")]
    if ev.baselines:
        fit_x, fit_langs = _sample_store(
            enc.stores["base", plan.posthoc_coll.name],
            max(1, ev.posthoc_max_passages // max(1, _corpus_lang_count(plan.posthoc_coll))),
            ev.seed,
        )
        for b in ev.baselines:
            t = fit_lsar(fit_x, fit_langs, ev.lsar_rank) if b == "lsar" else fit_leace(fit_x, fit_langs)
            variants.append(Variant(f"base+{b.upper()}", "base", t))
    if "lancer" in plan.models:
        variants.append(Variant("lancer", "lancer"))
    return variants


@dataclass
class Retrieval:
    """Scores of every variant on every scored collection."""

    # variant -> collection -> {"all": {measure: value}, "<lang>": {...}} (+ "Recall@5kt" style entries)
    results: dict[str, dict[str, dict[str, dict[str, float]]]] = field(default_factory=dict)
    # variant -> collection -> recall@top_k of the approximate index against exact search (approximate indexes only)
    index_recall: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def metric_groups(self, top_k: int) -> list[dict[str, float]]:
        """The MLflow metrics (step 0), one group per variant and collection (its index recall, then its measures
        per language; NaN left out), so no single log call grows past MLflow's 1000 metrics per batch."""
        groups: list[dict[str, float]] = []
        for vname, per_coll in self.results.items():
            for cname, res in per_coll.items():
                if cname in self.index_recall.get(vname, {}):
                    groups.append(
                        {metric_key(vname, cname, f"index_recall@{top_k}"): self.index_recall[vname][cname]}
                    )
                groups.append(
                    {
                        metric_key(vname, cname, lang, m): v
                        for lang, ms in res.items()
                        for m, v in ms.items()
                        if not np.isnan(v)
                    }
                )
        return groups


def search_stage(
    ev: EvalConfig, plan: EvalPlan, enc: Encoded, variants: list[Variant], log: Callable[[str], None]
) -> Retrieval:
    """Sharded search of every variant over every scored collection; writes ``runs/<variant>/<collection>.trec``
    and scores each run per language (plus Recall@kt on collections with answers)."""
    t0 = time.perf_counter()
    ret = Retrieval()
    for var in variants:
        vname, tag, tf = var.name, var.model, var.transform
        ret.results[vname] = {}
        for c in plan.colls:
            q = enc.queries[tag, c.name]
            q = tf(q) if tf is not None else q
            store = enc.stores[tag, c.name]
            sr = search_store(
                store.path,
                q,
                ev.top_k,
                ev.index_spec(),
                transform=tf,
                **ev.search_options(),
                seed=ev.seed,
            )
            recall = index_recall(store.path, q, sr, ev, tf)
            if recall is not None:
                ret.index_recall.setdefault(vname, {})[c.name] = recall
                log(
                    f"[eval] {vname} {c.name}: recall@{ev.top_k} of {ev.index_spec()} vs exact = {recall:.4f}"
                )
            run = sr.to_run(c.qids)
            write_run(
                plan.out / "runs" / vname.replace("+", "_") / f"{c.name.replace('/', '_')}.trec",
                run,
                tag=vname,
            )
            res = evaluate_by_language(c.qrels, run, ev.measures, dict(zip(c.qids, c.query_langs)))
            if c.answers:
                texts = _corpus_texts(c)
                ranked = dict(zip(c.qids, sr.docids))
                for kt in ev.recall_kt:
                    name = f"Recall@{kt // 1000}kt" if kt % 1000 == 0 else f"Recall@{kt}t"
                    for lang, v in recall_at_kt(
                        ranked, texts, c.answers, kt, dict(zip(c.qids, c.query_langs))
                    ).items():
                        res.setdefault(lang, {})[name] = v
            ret.results[vname][c.name] = res
    ret.seconds = time.perf_counter() - t0
    return ret


@dataclass
class Analyses:
    """The language-bias analyses: the language-ID probe (Table 1), pool growth (Fig. 1/3), t-SNE (Fig. 5)."""

    probe: dict[str, float] = field(default_factory=dict)  # variant -> language-ID accuracy
    probe_interval: dict[str, tuple[float, float]] = field(
        default_factory=dict
    )  # variant -> 95 % Wilson interval
    # variant -> {"erasure_abs", "erasure_floor", "erasure_over_floor"} on the probe's held-out half
    probe_erasure: dict[str, dict[str, float]] = field(default_factory=dict)
    pool_growth: dict[str, list[tuple[int, str, float]]] = field(
        default_factory=dict
    )  # variant -> (n, lang, v)
    pool_growth_measure: str = "nDCG@10"
    figures: list[Path] = field(default_factory=list)  # pool_growth.png, tsne.png
    seconds: dict[str, float] = field(default_factory=dict)  # "probe", "pool_growth", "tsne" -> wall time

    def probe_metrics(self) -> dict[str, float]:
        """The probe's MLflow metrics (step 0)."""
        return {
            **{metric_key(v, "probe_language_id_accuracy"): a for v, a in self.probe.items()},
            **{
                metric_key(v, "probe_language_id_accuracy_low"): lo
                for v, (lo, _) in self.probe_interval.items()
            },
            **{
                metric_key(v, "probe_language_id_accuracy_high"): hi
                for v, (_, hi) in self.probe_interval.items()
            },
            **{
                metric_key(v, f"probe_{k}"): val
                for v, d in self.probe_erasure.items()
                for k, val in d.items()
            },
        }

    def pool_growth_metrics(self) -> list[tuple[dict[str, float], int]]:
        """Pool growth as MLflow metrics: (metrics, step = number of pool languages)."""
        return [
            ({metric_key(vname, "pool_growth", self.pool_growth_measure): v}, n_lang)
            for vname, curve in self.pool_growth.items()
            for n_lang, _, v in curve
        ]


def analyses_stage(ev: EvalConfig, plan: EvalPlan, enc: Encoded, variants: list[Variant]) -> Analyses:
    """Probe accuracy and L_C per variant, nDCG@10 as languages join the pool, and the t-SNE figure."""
    an = Analyses()
    # Table 1: language-ID probe accuracy on the held-out half of a balanced per-language sample. A post-hoc
    # baseline is refitted on the probe's training half only: fitted on passages that include the test half, an
    # eraser equalises the language means over train + test, so the train half's means mirror the test half's
    # and the probe scores *below* chance - an artefact, not a measurement.
    t0 = time.perf_counter()
    for var in variants:
        vname, tf = var.name, var.transform
        x, langs = _sample_store(enc.stores[var.model, plan.probe_coll.name], ev.probe_per_language, ev.seed)
        lab = np.asarray(langs)
        # every other passage OF EACH LANGUAGE (the probe cross-validates per language on its train half)
        train = np.zeros(len(lab), dtype=bool)
        for lang in set(langs):
            train[np.flatnonzero(lab == lang)[::2]] = True
        if tf is not None:
            fit = fit_lsar if tf.name == "lsar" else fit_leace
            kw = {"rank": ev.lsar_rank} if tf.name == "lsar" else {}
            tf_probe = fit(x[train], list(lab[train]), **kw)
            x = tf_probe(x)
        pf = fit_language_probe(
            x[train], list(lab[train]), x[~train], list(lab[~train]), seed=ev.seed, n_jobs=ev.probe_jobs
        )
        an.probe[vname] = pf.test_accuracy
        an.probe_interval[vname] = (pf.ci_low, pf.ci_high)
        # L_C of the held-out half (the half no post-hoc eraser was fitted on), beside its floor
        an.probe_erasure[vname] = population_erasure(x[~train], list(lab[~train]))
    an.seconds["probe"] = time.perf_counter() - t0

    # Fig. 1/3: nDCG@10 as languages are added to the pool.
    growth = plan.growth_coll
    if growth is not None:
        t0 = time.perf_counter()
        present = sorted(set(growth.query_langs))
        order = [x for x in ev.language_order if x in present] or (
            (["en"] if "en" in present else []) + [x for x in present if x != "en"]
        )
        for var in variants:
            p_emb, docids, p_langs = enc.stores[var.model, growth.name].load_all()
            an.pool_growth[var.name] = pool_growth(
                enc.queries[var.model, growth.name],
                growth.qids,
                growth.query_langs,
                p_emb,
                docids,
                p_langs,
                growth.qrels,
                order,
                an.pool_growth_measure,
                ev.top_k,
                var.transform,
            )
        an.figures.append(
            plot_pool_growth(an.pool_growth, plan.out / "pool_growth.png", an.pool_growth_measure)
        )
        an.seconds["pool_growth"] = time.perf_counter() - t0

    # Fig. 5: t-SNE of passages coloured by language.
    if ev.tsne_samples > 0:
        t0 = time.perf_counter()
        tsne_x: dict[str, np.ndarray] = {}
        langs_t: list[str] = []
        for var in variants:
            x, langs_t = _sample_store(
                enc.stores[var.model, plan.probe_coll.name], ev.tsne_samples, ev.seed + 1
            )
            tsne_x[var.name] = var.transform(x) if var.transform is not None else x
        an.figures.append(tsne_plot(tsne_x, langs_t, plan.out / "tsne.png", ev.seed))
        an.seconds["tsne"] = time.perf_counter() - t0
    return an


def report_stage(
    plan: EvalPlan, variants: list[Variant], ret: Retrieval, an: Analyses, seconds: dict[str, float]
) -> EvalReport:
    """Table 2 (+ the Table 1 column), one row per variant, written as ``table.md`` / ``table.csv``, and everything
    in ``results.json``; ``seconds`` are the stages' wall times (``total`` included)."""
    report = EvalReport(
        plan.out,
        results=ret.results,
        probe=an.probe,
        probe_interval=an.probe_interval,
        probe_erasure=an.probe_erasure,
        pool_growth=an.pool_growth,
        artifacts=list(an.figures),
        seconds=seconds,
        index_recall=ret.index_recall,
    )
    for var in variants:
        row: dict[str, Any] = {"method": var.name}
        for c in plan.colls:
            for meas, v in ret.results[var.name][c.name]["all"].items():
                row[f"{c.name} {meas}"] = v
        row["probe acc"] = an.probe[var.name]
        row["probe 95% low"], row["probe 95% high"] = an.probe_interval[var.name]
        row["L_C / floor"] = an.probe_erasure[var.name]["erasure_over_floor"]
        report.table.append(row)
    out = plan.out
    (out / "table.md").write_text(format_table(report.table) + "\n")
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(report.table[0]))
        w.writeheader()
        w.writerows(report.table)
    (out / "results.json").write_text(
        json.dumps(
            {
                "results": report.results,
                "probe": report.probe,
                "probe_interval": report.probe_interval,
                "probe_erasure": report.probe_erasure,
                "pool_growth": report.pool_growth,
                "table": report.table,
                "seconds": report.seconds,
                "index_recall": report.index_recall,
                "collections": {c.name: str(c.path) for c in plan.colls},
                "models": {k: str(v) for k, v in plan.models.items()},
            },
            indent=1,
        )
    )
    report.artifacts += [out / "table.md", out / "table.csv", out / "results.json"]
    return report


def run_eval(cfg: RunConfig, progress: bool = True, log: Callable[[str], None] | None = None) -> EvalReport:
    """Run the whole evaluation described by ``cfg.eval`` (see the module docstring): plan -> encode -> fit post-hoc
    baselines -> search + metrics -> analyses -> report, each stage's metrics logged to MLflow when it is done."""
    from lancer_dist.retrieval.ray_utils import ensure_ray

    log = log or _log.info
    ev = cfg.eval
    t_all = time.perf_counter()
    plan = plan_eval(cfg)
    # The training tracker: an on-disk outbox in <eval output>/mlflow_spool delivered by a background thread, so
    # an unreachable store neither stalls nor kills evaluation, and secrets are redacted. The store is the run's
    # (by default sqlite next to output_dir, like training), and its artifacts go where that store keeps them.
    tracking = dataclasses.replace(
        cfg.tracking, tracking_uri=resolve_tracking_uri(cfg.tracking.tracking_uri, cfg.output_dir)
    )
    tracker = Tracker(tracking, run_dir=plan.out, rank=0)
    run_id = tracker.start({"eval": config_to_dict(ev)}, run_name=f"eval-{cfg.name}")
    started_ray = ensure_ray(ev.ray_address)
    status = "FAILED"
    try:
        enc = encode_stage(cfg, plan, progress, log)
        variants = fit_baselines(ev, plan, enc)
        ret = search_stage(ev, plan, enc, variants, log)
        for metrics in ret.metric_groups(ev.top_k):
            tracker.log_metrics(metrics, step=0)
        an = analyses_stage(ev, plan, enc, variants)
        tracker.log_metrics(an.probe_metrics(), step=0)
        for metrics, step in an.pool_growth_metrics():
            tracker.log_metrics(metrics, step=step)
        seconds = {**enc.seconds, "search+metrics": ret.seconds, **an.seconds}
        seconds["total"] = time.perf_counter() - t_all
        report = report_stage(plan, variants, ret, an, seconds)
        columns = list(report.table[0])
        tracker.log_dict(
            {"columns": columns, "data": [[r.get(c) for c in columns] for r in report.table]},
            "eval/table2.json",
        )
        for a in report.artifacts:
            tracker.log_artifact(a, "eval")
        status = "FINISHED"
    finally:
        tracker.finish(status)
        run_id = tracker.run_id or run_id
        if started_ray:
            import ray

            ray.shutdown()
    report.mlflow_run_id = run_id
    return report


def _corpus_lang_count(c: EvalCollection) -> int:
    """Number of passage languages (first 100k passages), used to pick the most multilingual collection."""
    langs: set[str] = set()
    plans = plan_shards(c.corpus, 100000)
    if plans:
        langs.update(read_corpus_range(plans[0])[2])
    return len(langs)
