"""``lancer data mine``: the verb over :func:`lancer_dist.retrieval.mine.mine_hard_negatives` (Ray encoder pool or
``--no-ray``); prints the shard summary as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lancer_dist.retrieval.mine import MineOptions, mine_hard_negatives


def _cli(args: argparse.Namespace) -> int:
    from lancer_dist.logs import setup_logging

    setup_logging()
    from lancer_dist.config import load_config
    from lancer_dist.data.errors import DataError
    from lancer_dist.retrieval.cli import _spec
    from lancer_dist.retrieval.encode import EncoderPool

    try:
        cfg = load_config(args.config, args.overrides)
        opts = MineOptions(
            rank_min=args.rank_min,
            rank_max=args.rank_max,
            margin=None if args.margin.lower() == "none" else float(args.margin),
            num_negatives=None if args.num_negatives <= 0 else args.num_negatives,
            min_negatives=args.min_negatives,
            seed=args.seed,
            split=args.split,
            index=cfg.eval.index_factory,
            shard_size=cfg.eval.shard_size,
            batch_size=cfg.eval.batch_size,
            max_records_per_shard=args.max_records_per_shard,
        )
        spec = _spec(cfg, args.model, Path(args.out))
        if args.no_ray:
            result = mine_hard_negatives(spec, args.collection, args.out, opts, overwrite=args.overwrite)
        else:
            with EncoderPool(
                spec,
                num_workers=cfg.eval.num_workers,
                cpus_per_worker=cfg.eval.cpus_per_worker,
                ray_address=cfg.eval.ray_address,
                start_timeout_s=cfg.eval.worker_start_timeout_s,
            ) as pool:
                result = mine_hard_negatives(
                    spec, args.collection, args.out, opts, pool=pool, overwrite=args.overwrite
                )
    except (DataError, FileExistsError, ValueError) as e:
        print(f"lancer: error: {e}", file=sys.stderr)
        return 1
    print(
        json.dumps({"out": str(args.out), "shards": len(result.manifest.shards), **result.counts}, indent=1)
    )
    return 0


def register(dsub: argparse._SubParsersAction) -> None:
    p = dsub.add_parser(
        "mine",
        help="mine hard negatives with a model (Ray encode + search) -> retrieval-group shards",
        description="Encodes the corpus of a BEIR training collection (Ray actors, eval.num_workers / "
        "eval.cpus_per_worker), searches every query of qrels/<split>.tsv, and keeps as negatives the passages at "
        "ranks --rank-min..--rank-max that are not positives and score at most min(positive score) - --margin.",
    )
    p.add_argument(
        "--out", required=True, help="output shard directory (the embeddings go to OUT/embeddings)"
    )
    p.add_argument("--config", default=None, help="run config (model prefixes / lengths, eval section)")
    p.add_argument("--collection", required=True, help="BEIR directory: corpus.jsonl, queries.jsonl, qrels/")
    p.add_argument("--model", help="model directory (default: the config's model)")
    p.add_argument("--split", default="train", help="qrels split (qrels/<split>.tsv)")
    p.add_argument("--rank-min", type=int, default=10)
    p.add_argument("--rank-max", type=int, default=100)
    p.add_argument("--margin", default="0.05", help="score margin below the positive, or 'none'")
    p.add_argument("--num-negatives", type=int, default=30, help="negatives per query (0: all eligible)")
    p.add_argument("--min-negatives", type=int, default=1, help="drop (and count) queries with fewer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-records-per-shard", type=int, default=10000)
    p.add_argument("--no-ray", action="store_true", help="encode in this process instead of Ray actors")
    p.add_argument("--overwrite", action="store_true", help="replace existing shards in OUT")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    p.set_defaults(func=_cli)
