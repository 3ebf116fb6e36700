"""Tokenised training batches per second from :class:`lancer_dist.data.stream.TrainStream`.

Quickstart-like step: erasure 16 languages x 4 passages, 16 queries x group 4 (1 positive + 3 negatives), max
lengths 64 (queries) / 128 (passages), one rank, on the offline Bible shards and the multilingual-e5-small tokenizer
(250k pieces) from ``${LANCER_CACHE}``. Reports, per ``num_workers``: time to the first batch (worker start-up, shard
reads), steady-state batches/s after it, and the time to resume mid-epoch from a state_dict (epoch replay).

    python benchmarks/bench_loader.py [--steps 200] [--workers 0 1 2] [--world-sizes 1 2] [--data DIR] [--tokenizer DIR]

With ``--world-sizes``, the stream of rank 0 of a W-rank run is measured (per-rank throughput; its batches hold
1/W of each global step).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any


def _tokenizer(path: Path) -> tuple[Any, str]:
    from transformers import AutoTokenizer

    if (path / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(path)), f"{path.name} ({path})"
    print(f"NOTE: no tokenizer at {path} (build it with `lancer data backbone`); exiting", file=sys.stderr)
    raise SystemExit(2)


def main() -> int:
    from lancer_dist.paths import cache_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", default=str(cache_dir() / "data" / "bible"), help="dir with erasure/ and retrieval/"
    )
    ap.add_argument("--tokenizer", default=str(cache_dir() / "models" / "multilingual-e5-small"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--world-sizes", type=int, nargs="+", default=[1])
    ap.add_argument("--languages", type=int, default=16)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from lancer_dist.config import load_config
    from lancer_dist.data.shards import read_manifest
    from lancer_dist.data.stream import TrainStream

    data = Path(args.data)
    if not (data / "erasure" / "manifest.json").is_file():
        print(f"NOTE: no Bible shards under {data}; building them (lancer_dist.offline)", file=sys.stderr)
        from lancer_dist.offline import ensure_bible_data

        ensure_bible_data(data)
    tok, tok_name = _tokenizer(Path(args.tokenizer))
    langs = read_manifest(data / "erasure").languages[: args.languages]
    results: dict[str, Any] = {
        "tokenizer": tok_name,
        "data": str(data),
        "languages": langs,
        "steps": args.steps,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "runs": [],
    }
    for world, workers in [(w, k) for w in args.world_sizes for k in args.workers]:
        overrides = {
            "model.name_or_path": "unused",
            "model.query_prefix": "query: ",
            "model.passage_prefix": "passage: ",
            "model.max_query_length": 64,
            "model.max_passage_length": 128,
            "data.erasure.path": str(data / "erasure"),
            "data.erasure.languages": langs,
            "data.erasure.passages_per_language": 4,
            "data.retrieval.path": str(data / "retrieval"),
            "data.retrieval.queries_per_step": 16,
            "data.retrieval.group_size": 4,
            "data.shuffle_buffer": 256,
            "data.num_workers": workers,
            "train.steps": args.steps,
            "train.warmup_steps": 0,
        }
        cfg = load_config(None, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])
        stream = TrainStream.from_config(cfg, tok, rank=0, world_size=world)
        t0 = time.perf_counter()
        it = iter(stream)
        first = next(it)
        t1 = time.perf_counter()
        c1 = time.process_time()
        n = 0
        for _ in it:
            n += 1
        t2 = time.perf_counter()
        c2 = time.process_time()
        # resume mid-run from the state after step steps//2 (replays the current epoch of each sub-stream)
        half = TrainStream.from_config(cfg, tok, rank=0, world_size=world, num_steps=args.steps // 2)
        for _ in half:
            pass
        resumed = TrainStream.from_config(cfg, tok, rank=0, world_size=world)
        resumed.load_state_dict(half.state_dict())
        t3 = time.perf_counter()
        next(iter(resumed))
        t4 = time.perf_counter()
        run = {
            "world_size": world,
            "num_workers": workers,
            "first_batch_s": round(t1 - t0, 3),
            "batches_per_s": round(n / (t2 - t1), 1),
            # CPU time of this process per batch: robust to other jobs on a shared machine, but it counts the
            # whole loader only with num_workers 0 (the workers' CPU time is not in it)
            "cpu_ms_per_batch": round(1000 * (c2 - c1) / n, 2) if workers == 0 else None,
            "resume_first_batch_s": round(t4 - t3, 3),
            "erasure_shape": list(first.erasure_input_ids.shape),
            "query_shape": list(first.query_input_ids.shape),
            "passage_shape": list(first.passage_input_ids.shape),
        }
        results["runs"].append(run)
        print(json.dumps(run), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
