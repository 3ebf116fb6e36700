"""``lancer encode | search | eval | eval metrics``: thin entry points over :mod:`lancer_dist.retrieval`.

* ``lancer encode --config FILE --collection DIR --out DIR [--model DIR] [key=value ...]``
* ``lancer search --config FILE --embeddings DIR --collection DIR --run FILE [--model DIR] [key=value ...]``
* ``lancer eval --config FILE [key=value ...]``
* ``lancer eval metrics --qrels FILE --run FILE [--measures nDCG@10 AP@100 R@100 RR@10] [--collection DIR]``

Settings (index type, shard size, workers, top-k, dtype ...) come from the config's ``eval`` section; the flags
only name inputs and outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lancer_dist.logs import setup_logging

DEFAULT_MEASURES = ["nDCG@10", "AP@100", "R@100", "RR@10"]


def _spec(cfg, model: str | None, out_dir: Path):  # type: ignore[no-untyped-def]
    from lancer_dist.model.hub import resolve_model_dir
    from lancer_dist.retrieval.encoder_io import EncoderSpec
    from lancer_dist.retrieval.evaluate import resolve_base_model

    path = (
        resolve_model_dir(model, "--model", cache_dir=cfg.model.cache_dir)
        if model
        else resolve_base_model(cfg, out_dir)
    )
    return EncoderSpec.from_model_config(str(path), cfg.model)


def _encode(args: argparse.Namespace) -> int:
    setup_logging()
    from lancer_dist.config import load_config
    from lancer_dist.retrieval.encode import encode_corpus

    cfg = load_config(args.config, args.overrides)
    ev = cfg.eval
    out = Path(args.out)
    res = encode_corpus(
        _spec(cfg, args.model, out.parent),
        args.collection,
        out,
        num_workers=ev.num_workers,
        cpus_per_worker=ev.cpus_per_worker,
        ray_address=ev.ray_address,
        start_timeout_s=ev.worker_start_timeout_s,
        shard_size=ev.shard_size,
        dtype=ev.dtype,
        batch_size=ev.batch_size,
    )
    print(
        json.dumps(
            {
                "out_dir": str(res.out_dir),
                "passages": res.num_passages,
                "shards": res.num_shards,
                "encoded_shards": res.encoded_shards,
                "skipped_shards": res.skipped_shards,
                "worker_failures": res.worker_failures,
                "seconds": round(res.seconds, 2),
                "passages_per_second": round(res.passages_per_second, 1) if res.encoded_shards else None,
            }
        )
    )
    return 0


def _search(args: argparse.Namespace) -> int:
    setup_logging()
    from lancer_dist.config import load_config
    from lancer_dist.retrieval.encoder_io import load_encoder
    from lancer_dist.retrieval.evaluate import load_eval_collection
    from lancer_dist.retrieval.metrics import evaluate
    from lancer_dist.retrieval.ray_utils import ensure_ray
    from lancer_dist.retrieval.search import search_store
    from lancer_dist.retrieval.trec import write_run

    cfg = load_config(args.config, args.overrides)
    ev = cfg.eval
    coll = load_eval_collection(args.collection)
    spec = _spec(cfg, args.model, Path(args.run).parent)
    q = load_encoder(spec).encode(coll.query_texts, is_query=True, batch_size=ev.batch_size)
    started = ensure_ray(ev.ray_address)
    try:
        res = search_store(
            args.embeddings,
            q,
            ev.top_k,
            ev.index_spec(),
            **ev.search_options(),
            seed=ev.seed,
        )
    finally:
        if started:
            import ray

            ray.shutdown()
    run = res.to_run(coll.qids)
    write_run(args.run, run)
    print(
        json.dumps(
            {
                "run": str(args.run),
                "queries": len(coll.qids),
                "seconds": round(res.seconds, 2),
                **evaluate(coll.qrels, run, ev.measures),
            }
        )
    )
    return 0


def _metrics_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lancer eval metrics",
        description="Print a JSON object of measures for a TREC run against qrels.",
    )
    p.add_argument("--qrels", required=True, help="TREC qrels (qid iter docid rel) or BEIR qrels tsv")
    p.add_argument("--run", required=True, help="TREC run file (qid Q0 docid rank score tag)")
    p.add_argument(
        "--measures",
        nargs="+",
        default=DEFAULT_MEASURES,
        help="ir-measures names; Recall@5kt / Recall@2kt need --collection with query answers",
    )
    p.add_argument(
        "--collection",
        default=None,
        help="BEIR dir: per-language breakdown (query 'lang'), Recall@kt (query 'answers' + corpus)",
    )
    return p


def _metrics(argv: list[str]) -> int:
    import re

    from lancer_dist.retrieval.metrics import evaluate, evaluate_by_language, recall_at_kt
    from lancer_dist.retrieval.trec import read_qrels, read_run

    args = _metrics_parser().parse_args(argv)
    qrels, run = read_qrels(args.qrels), read_run(args.run)
    kt = {
        m: int(re.fullmatch(r"Recall@(\d+)kt", m).group(1)) * 1000  # type: ignore[union-attr]
        for m in args.measures
        if re.fullmatch(r"Recall@(\d+)kt", m)
    }
    std = [m for m in args.measures if m not in kt]
    if args.collection is None:
        if kt:
            print(
                "lancer eval metrics: Recall@kt needs --collection (answers and passage texts)",
                file=sys.stderr,
            )
            return 2
        print(json.dumps(evaluate(qrels, run, std)))
        return 0
    from lancer_dist.retrieval.evaluate import _corpus_texts, load_eval_collection

    coll = load_eval_collection(args.collection)
    qlang = dict(zip(coll.qids, coll.query_langs))
    out = evaluate_by_language(qrels, run, std, qlang) if std else {"all": {}}
    if kt:
        texts = _corpus_texts(coll)
        ranked = {
            q: [d for d, _ in sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))] for q, docs in run.items()
        }
        for name, n in kt.items():
            for lang, v in recall_at_kt(ranked, texts, coll.answers, n, qlang).items():
                out.setdefault(lang, {})[name] = v
    print(json.dumps(out))
    return 0


def _eval(args: argparse.Namespace) -> int:
    setup_logging()
    rest = list(args.rest)
    if rest and rest[0] == "metrics":
        return _metrics(rest[1:])
    if args.config is None:
        print("lancer eval: --config FILE is required (or use `lancer eval metrics ...`)", file=sys.stderr)
        return 2
    bad = [r for r in rest if "=" not in r]
    if bad:
        print(f"lancer eval: expected key=value overrides, got {bad}", file=sys.stderr)
        return 2
    from lancer_dist.config import load_config
    from lancer_dist.retrieval.evaluate import format_table, run_eval

    cfg = load_config(args.config, rest)
    report = run_eval(cfg)
    print(format_table(report.table))
    print(
        json.dumps(
            {
                "output_dir": str(report.output_dir),
                "mlflow_run_id": report.mlflow_run_id,
                "seconds": {k: round(v, 1) for k, v in report.seconds.items()},
            }
        )
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    enc = sub.add_parser("encode", help="encode a corpus with a Ray actor pool into sharded embeddings")
    enc.add_argument("--config", required=True, help="YAML run config (model + eval sections)")
    enc.add_argument("--collection", required=True, help="BEIR collection dir (or a corpus.jsonl)")
    enc.add_argument(
        "--out", required=True, help="output directory (re-running resumes / skips finished shards)"
    )
    enc.add_argument("--model", default=None, help="encoder dir (default: eval.model / model.name_or_path)")
    enc.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    enc.set_defaults(func=_encode)

    se = sub.add_parser("search", help="sharded FAISS search of a collection's queries; writes a TREC run")
    se.add_argument("--config", required=True)
    se.add_argument("--embeddings", required=True, help="directory written by `lancer encode`")
    se.add_argument("--collection", required=True, help="BEIR dir whose queries are searched")
    se.add_argument("--run", required=True, help="output TREC run file")
    se.add_argument(
        "--model", default=None, help="query encoder dir (default: eval.model / model.name_or_path)"
    )
    se.add_argument("overrides", nargs="*")
    se.set_defaults(func=_search)

    ev = sub.add_parser(
        "eval",
        help="encode + search + metrics + post-hoc baselines + bias analyses; or `eval metrics`",
        description="`lancer eval --config FILE [key=value ...]` runs the evaluation of the config's eval section; "
        "`lancer eval metrics --qrels FILE --run FILE [--measures ...] [--collection DIR]` prints measures as JSON.",
    )
    ev.add_argument("--config", default=None)
    ev.add_argument(
        "rest", nargs=argparse.REMAINDER, help="key=value overrides, or: metrics --qrels ... --run ..."
    )
    ev.set_defaults(func=_eval)
