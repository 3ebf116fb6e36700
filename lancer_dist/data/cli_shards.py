"""``lancer data passages | groups | inspect``: write and check training shards."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any


def _reports_data_errors(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from lancer_dist.data.errors import DataError

        try:
            return fn(args)
        except (DataError, FileExistsError, ValueError) as e:
            print(f"lancer: error: {e}", file=sys.stderr)
            return 1

    return run


def _print_counts(manifest: Any, counts: dict[str, Any]) -> None:
    print(json.dumps({"out": str(manifest.root), "shards": len(manifest.shards), **counts}, indent=1))


@_reports_data_errors
def _passages(args: argparse.Namespace) -> int:
    from lancer_dist.data.sources import PassageOptions, write_passage_shards

    opts = PassageOptions(
        text_field=args.text_field,
        lang_field=args.lang_field,
        id_field=args.id_field,
        lang=args.lang,
        languages=[x for x in (args.languages or "").split(",") if x],
        split=args.split,
        tsv_columns=args.tsv_columns.split(","),
        min_chars=args.min_chars,
        max_chars=args.max_chars,
        dedup=not args.no_dedup,
        max_per_language=args.max_per_language,
        sample=args.sample,
        seed=args.seed,
        skip_bad=args.skip_bad,
        max_records_per_shard=args.max_records_per_shard,
    )
    manifest, counts = write_passage_shards(args.input, args.out, opts, overwrite=args.overwrite)
    _print_counts(manifest, counts)
    return 0


@_reports_data_errors
def _groups(args: argparse.Namespace) -> int:
    from lancer_dist.data.sources import GroupOptions, write_group_shards

    opts = GroupOptions(
        split=args.split,
        format=args.format,
        min_negatives=args.min_negatives,
        max_negatives=args.max_negatives,
        skip_bad=args.skip_bad,
        max_records_per_shard=args.max_records_per_shard,
    )
    manifest, counts = write_group_shards(args.input, args.out, opts, overwrite=args.overwrite)
    _print_counts(manifest, counts)
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from lancer_dist.data.errors import DataError
    from lancer_dist.data.shards import read_manifest, verify_shards

    try:
        m = read_manifest(args.dir)
        info: dict[str, Any] = {
            "kind": m.kind,
            "shards": len(m.shards),
            "num_records": m.num_records,
            "totals": m.totals,
            "created": m.created,
            "source": m.source,
        }
        if args.verify:
            info["verified"] = verify_shards(m)
    except DataError as e:
        print(f"lancer: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=1, ensure_ascii=False))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output shard directory")
    p.add_argument(
        "--input",
        "-i",
        action="append",
        required=True,
        metavar="KIND:LOC",
        help="jsonl:FILE, parquet:FILE, csv:FILE, tsv:FILE, c4:DIR (allenai/c4 multilingual/*.json.gz) or "
        "hf:HUB_ID_OR_SAVED_FOLDER (repeatable)",
    )
    p.add_argument("--split", default="train", help="dataset split for hf: inputs")
    p.add_argument("--max-records-per-shard", type=int, default=10000)
    p.add_argument(
        "--skip-bad", action="store_true", help="skip and count malformed records instead of failing"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing shards in OUT")


def register(dsub: argparse._SubParsersAction) -> None:
    p = dsub.add_parser(
        "passages",
        help="multilingual passages with language labels -> webdataset shards + manifest",
        description="Filters: length (on stripped text), exact duplicates per language, a per-language cap. "
        "Every record not written is counted by reason; counts are printed and stored in the manifest.",
    )
    _common(p)
    p.add_argument("--languages", help="comma-separated language codes to keep (hf: one config per language)")
    p.add_argument("--lang", help="language of inputs without a language column")
    p.add_argument("--text-field", default="text")
    p.add_argument("--lang-field", default="lang")
    p.add_argument("--id-field", default="id")
    p.add_argument("--tsv-columns", default="id,text", help="column names of tsv: inputs (e.g. id,text,lang)")
    p.add_argument("--min-chars", type=int, default=1)
    p.add_argument("--max-chars", type=int, default=None)
    p.add_argument("--max-per-language", type=int, default=None)
    p.add_argument(
        "--sample",
        choices=["head", "reservoir"],
        default="head",
        help="how --max-per-language picks: the first ones (head) or a seeded uniform sample of the stream",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of --sample reservoir")
    p.add_argument("--no-dedup", action="store_true", help="keep exact duplicate texts")
    p.set_defaults(func=_passages)

    g = dsub.add_parser(
        "groups",
        help="retrieval groups (Tevatron, FlagEmbedding, sentence-transformers, MS MARCO triples) -> shards",
        description="--format tevatron: {query_id, query, positive_passages, negative_passages}; flagembedding: "
        "{query, pos: [text], neg: [text]}; sentence-transformers: columns anchor, positive, negative... (by "
        "order; jsonl:, csv:, parquet:, hf:); msmarco-triples: tsv: lines query<TAB>positive<TAB>negative. Every "
        "stored negative is kept (up to --max-negatives); the group size is chosen when training "
        "(data.retrieval.group_size). Formats without document ids get ids from the text (same text = same id).",
    )
    _common(g)
    g.add_argument(
        "--format",
        default="tevatron",
        choices=["tevatron", "flagembedding", "sentence-transformers", "msmarco-triples"],
        help="how each input row maps to a group (default tevatron)",
    )
    g.add_argument(
        "--min-negatives", type=int, default=0, help="drop (and count) groups with fewer negatives"
    )
    g.add_argument(
        "--max-negatives", type=int, default=None, help="store at most this many negatives per group"
    )
    g.set_defaults(func=_groups)

    i = dsub.add_parser(
        "inspect", help="print a shard directory's manifest; --verify reads and checks every shard"
    )
    i.add_argument("dir")
    i.add_argument("--verify", action="store_true")
    i.set_defaults(func=_inspect)
