"""Benchmark: exact and approximate search at corpus scale (1,000,000 x 384 by default), side by side in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_search_scale.py [--n 1000000] [--dim 384] [--queries 500] [--k 100]

The corpus is synthetic, written as an embedding store in float32 and in float16 (shards of ``--shard-size``):
``--clusters`` Gaussian clusters of unit vectors (uniform random vectors have no neighbourhood structure, so no
approximate index could do better than chance on them); queries are corpus points plus noise. Every measurement
runs in a fresh subprocess, so its peak RSS (``VmHWM``) is that search's alone (the imports' RSS is shown).

Exact search, all top-``--k`` of the same queries:
- ``flat_1t`` / ``flat_2t``: one ``IndexFlatIP`` over the whole corpus loaded in memory (FAISS with 1 / 2 OpenMP
  threads): the baseline;
- ``none``: ``search_store(parallel="none")``: memory-mapped shards, blocks of ``--block`` rows, sequential, each
  block by the default kernel (torch matmul + top-k on the mapped rows), 1 torch thread;
- ``none_2t``: the same, torch with 2 intra-op threads (parallelism inside each block instead of across blocks);
- ``threads``: ``search_store(parallel="threads")`` with 2 threads (float32 and float16 stores), default kernel;
- ``threads_knn`` / ``threads_index``: the same with the ``faiss_knn`` kernel (``faiss.knn`` on the mapped rows) /
  the ``faiss_index`` kernel (each block copied into an ``IndexFlatIP``: the earlier default);
- ``ray``: ``search_store(parallel="ray", ray_tasks=2, cpus_per_task=1)`` on a local Ray instance of 2 CPUs (Ray
  start-up and a warm-up call excluded; the RSS shown is the driver's only).
Each result's positions are compared with ``flat_1t`` (fraction of identical top-k sets).

Approximate search (``--ann``): per-shard IVF-PQ indexes (built once, then searched with several ``nprobe``) and
per-shard HNSW indexes over the first ``--hnsw-n`` vectors (build time grows fast: see the docs), each trained on a
sample; recall@k against the exact top-k and speed-up over exact threaded search of the same vectors.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _rss_mb() -> float:
    """Peak RSS of this process's own memory (``VmHWM``). Not ``ru_maxrss``: Linux carries that over from the
    parent across fork + exec, so a child of a driver that had just written a 1.5 GB corpus reported the
    driver's peak, not its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_store(root: Path, n: int, dim: int, shard_size: int, clusters: int, dtype: str, seed: int) -> Path:
    """Write the synthetic corpus shard by shard (the driver never holds more than one shard). ``clusters`` > 0:
    a mixture of that many Gaussians (unit vectors); 0: i.i.d. Gaussian unit vectors, no structure at all."""
    from lancer_dist.fileio import atomic_write_json
    from lancer_dist.retrieval.store import FORMAT, write_shard

    out = root / (f"store-{dtype}" if clusters else f"store-gaussian-{dtype}")
    if (out / "manifest.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(max(1, clusters), dim)).astype(np.float32)
    shards = []
    for i, start in enumerate(range(0, n, shard_size)):
        m = min(n, start + shard_size) - start
        r = np.random.default_rng(seed + 1 + i)
        noise = r.normal(size=(m, dim)).astype(np.float32)
        x = centers[r.integers(0, clusters, m)] + 0.6 * noise if clusters else noise
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = [f"p{start + j}" for j in range(m)]
        write_shard(out, i, ids, ["und"] * m, x.astype(dtype))
        shards.append({"index": i, "count": m, "rows": m, "attempts": 1})
    atomic_write_json(
        out / "manifest.json",
        {
            "format": FORMAT,
            "complete": True,
            "model": {},
            "corpus": None,
            "corpus_bytes": None,
            "shard_size": shard_size,
            "dtype": dtype,
            "dim": dim,
            "num_passages": n,
            "shards": shards,
        },
    )
    return out


def make_queries(store: Path, nq: int, seed: int) -> np.ndarray:
    from lancer_dist.retrieval.store import EmbeddingStore

    emb, _, _ = EmbeddingStore(store).load_shard(0, mmap=True)
    rng = np.random.default_rng(seed)
    q = np.asarray(emb[np.sort(rng.choice(emb.shape[0], nq, replace=False))], dtype=np.float32)
    q += 0.3 * rng.normal(size=q.shape).astype(np.float32) / np.sqrt(q.shape[1])
    return q / np.linalg.norm(q, axis=1, keepdims=True)


# ---------------------------------------------------------------- child: one measurement in a fresh process


def child(mode: str, store: str, qfile: str, k: int, block: int, out: str, extra: str) -> None:
    import faiss

    from lancer_dist.retrieval.search import search_store
    from lancer_dist.retrieval.store import EmbeddingStore

    q = np.load(qfile)
    rss0 = _rss_mb()
    res: dict[str, object] = {"mode": mode}
    t0 = time.perf_counter()
    if mode.startswith("flat_"):
        faiss.omp_set_num_threads(int(mode.split("_")[1][0]))
        x, _, _ = EmbeddingStore(store).load_all()
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        del x
        t1 = time.perf_counter()
        _, pos = index.search(q, k)
        res["search_s"] = time.perf_counter() - t1
    elif mode in ("none", "none_2t", "threads", "threads_knn", "threads_index"):
        import torch

        torch.set_num_threads(2 if mode == "none_2t" else 1)
        kernel = {"threads_knn": "faiss_knn", "threads_index": "faiss_index"}.get(mode, "torch")
        parallel = "none" if mode.startswith("none") else "threads"
        r = search_store(store, q, k, parallel=parallel, threads=2, block=block, kernel=kernel)
        pos = r.positions
    elif mode == "ray":
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        search_store(store, q[:2], k, parallel="ray", ray_tasks=2, cpus_per_task=1, block=block)  # warm-up
        t0 = time.perf_counter()
        r = search_store(store, q, k, parallel="ray", ray_tasks=2, cpus_per_task=1, block=block)
        pos = r.positions
        ray.shutdown()
    elif mode == "ann":
        res.update(_ann(store, q, k, block, json.loads(extra)))
        pos = np.zeros((0, k), np.int64)
    else:
        raise ValueError(mode)
    res["seconds"] = time.perf_counter() - t0
    res["rss_imports_mb"] = rss0
    res["peak_rss_mb"] = _rss_mb()
    np.save(out + ".npy", pos)
    Path(out + ".json").write_text(json.dumps(res))


def _ann(store: str, q: np.ndarray, k: int, block: int, spec: dict) -> dict[str, object]:
    """Build per-shard indexes once (threads over shards), then search with each setting; exact reference too."""
    from concurrent.futures import ThreadPoolExecutor

    import faiss

    from lancer_dist.config import IndexConfig
    from lancer_dist.retrieval.search import (
        build_shard_index,
        merge_topk,
        rerank_exact,
        search_index_exact,
        search_store,
        topk_recall,
    )
    from lancer_dist.retrieval.store import EmbeddingStore, emb_path

    st = EmbeddingStore(store)
    rows = [s["rows"] for s in st.manifest["shards"]]
    offsets = np.cumsum([0, *rows])[:-1]
    cfg = IndexConfig(**spec["index"])
    out: dict[str, object] = {"index": spec["index"], "n": int(sum(rows))}

    def build(i: int):
        faiss.omp_set_num_threads(1)
        return build_shard_index(emb_path(st.path, i), cfg, block=block, seed=i)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        indexes = list(pool.map(build, range(st.num_shards)))
    out["build_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact = search_store(store, q, k, parallel="threads", threads=2, block=block)
    out["exact_threads_s"] = time.perf_counter() - t0
    settings = []
    param = "nprobe" if cfg.kind != "hnsw" else "efSearch"
    for v in spec["values"]:
        for idx in indexes:
            faiss.ParameterSpace().set_index_parameter(idx, param, v)
        for refine in spec.get("refine", [0]):

            def one(i: int, refine: int = refine) -> tuple[np.ndarray, np.ndarray]:
                faiss.omp_set_num_threads(1)
                if not refine:
                    return search_index_exact(indexes[i], q, k, int(offsets[i]))
                # eval.index.refine_factor: k * refine candidates re-scored against the memory-mapped vectors
                _, cand = search_index_exact(indexes[i], q, k * refine, int(offsets[i]))
                return rerank_exact(emb_path(st.path, i), int(offsets[i]), q, cand, k)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(2) as pool:
                parts = list(pool.map(one, range(st.num_shards)))
            _, pos = merge_topk(parts, k)
            sec = time.perf_counter() - t0
            settings.append(
                {
                    param: v,
                    "refine_factor": refine,
                    "search_s": sec,
                    f"recall@{k}": topk_recall(pos, exact.positions),
                    "speedup_vs_exact": out["exact_threads_s"] / sec,  # type: ignore[operator]
                }
            )
    out["settings"] = settings
    return out


def run_child(
    mode: str, store: Path, qfile: Path, args: argparse.Namespace, work: Path, extra: str = "{}"
) -> dict:
    out = work / f"res-{mode}-{store.name}"
    cmd = [sys.executable, str(HERE), "--_child", mode, str(store), str(qfile), str(out), extra]
    cmd += ["--k", str(args.k), "--block", str(args.block)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    res = json.loads(Path(str(out) + ".json").read_text())
    res["positions"] = np.load(str(out) + ".npy")
    res["store"] = store.name
    res["uptime"] = _uptime()
    print(json.dumps({k: v for k, v in res.items() if k != "positions"}), flush=True)
    return res


def same_sets(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([set(x.tolist()) == set(y.tolist()) for x, y in zip(a, b)]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--shard-size", type=int, default=250_000)
    ap.add_argument("--block", type=int, default=65536)
    ap.add_argument("--clusters", type=int, default=2000, help="0 = i.i.d. Gaussian vectors (no structure)")
    ap.add_argument("--modes", default="flat_1t,flat_2t,none,none_2t,threads,threads_knn,threads_index,ray")
    ap.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--ann", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--pq-m", type=int, default=48)
    ap.add_argument("--nprobes", default="8,32,128")
    ap.add_argument("--hnsw-n", type=int, default=200_000)
    ap.add_argument("--hnsw-m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=40)
    ap.add_argument("--ef-searches", default="128,256,512")
    ap.add_argument("--train-sample", type=int, default=50_000)
    ap.add_argument("--refines", default="0,4", help="IVF-PQ refine factors (0 = no re-ranking)")
    ap.add_argument(
        "--pq", action=argparse.BooleanOptionalAction, default=True, help="with --ann: run IVF-PQ"
    )
    ap.add_argument("--work", default="")
    ap.add_argument("--_child", nargs=5, default=None)
    args = ap.parse_args()
    if args._child:
        c = args._child
        child(c[0], c[1], c[2], args.k, args.block, c[3], c[4])
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-search-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"[bench] work dir {work}; {_uptime()}", flush=True)
    t0 = time.perf_counter()
    s32 = make_store(work, args.n, args.dim, args.shard_size, args.clusters, "float32", 0)
    s16 = (
        make_store(work, args.n, args.dim, args.shard_size, args.clusters, "float16", 0)
        if args.fp16
        else None
    )
    qfile = work / "queries.npy"
    np.save(qfile, make_queries(s32, args.queries, 1))
    print(f"[bench] corpus written in {time.perf_counter() - t0:.0f} s", flush=True)
    emb_mb = {"float32": args.n * args.dim * 4 / 2**20, "float16": args.n * args.dim * 2 / 2**20}
    results = {}
    for mode in [m for m in args.modes.split(",") if m]:
        results[mode] = run_child(mode, s32, qfile, args, work)
    if s16 is not None and "threads" in args.modes.split(","):
        results["threads_fp16"] = run_child("threads", s16, qfile, args, work)
    modes = [m for m in args.modes.split(",") if m]
    ref = results[modes[0]]["positions"] if modes else None
    summary: dict[str, object] = {
        "n": args.n,
        "dim": args.dim,
        "queries": args.queries,
        "k": args.k,
        "embedding_mb": emb_mb,
        "data": f"mixture of {args.clusters} Gaussians"
        if args.clusters
        else "i.i.d. Gaussian (no structure)",
    }
    for name, r in results.items():
        summary[name] = {
            "seconds": round(r["seconds"], 2),
            "peak_rss_mb": round(r["peak_rss_mb"]),
            "rss_imports_mb": round(r["rss_imports_mb"]),
            "same_topk_sets_as_" + modes[0]: same_sets(r["positions"], ref),
            "uptime": r["uptime"],
        }
    base = results.get("flat_1t")
    if base is not None:
        for name in results:
            summary[f"ratio flat_1t / {name}"] = round(base["seconds"] / results[name]["seconds"], 2)
    if "flat_2t" in results:
        for name in results:
            summary[f"ratio flat_2t / {name}"] = round(
                results["flat_2t"]["seconds"] / results[name]["seconds"], 2
            )
    for name in ("flat_1t", "flat_2t"):
        if (
            name in results
        ):  # the flat index's search alone (its load and add excluded) against each blocked mode
            for other in results:
                if not other.startswith("flat"):
                    summary[f"ratio {name} search-only / {other}"] = round(
                        results[name]["search_s"] / results[other]["seconds"], 2
                    )
    if args.ann and args.pq:
        pq = {
            "index": {
                "kind": "ivf_pq",
                "nlist": args.nlist,
                "pq_m": args.pq_m,
                "train_sample": args.train_sample,
            },
            "values": [int(v) for v in args.nprobes.split(",")],
            "refine": [int(v) for v in args.refines.split(",")],
        }
        summary["ivf_pq"] = run_child("ann", s32, qfile, args, work, json.dumps(pq))
        summary["ivf_pq"].pop("positions")  # type: ignore[attr-defined]
    if args.ann and args.hnsw_n:
        hn = make_store(work / "hnsw", args.hnsw_n, args.dim, args.hnsw_n // 2, args.clusters, "float32", 0)
        hq = work / "queries-hnsw.npy"
        np.save(hq, make_queries(hn, args.queries, 1))
        hs = {
            "index": {"kind": "hnsw", "hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction},
            "values": [int(v) for v in args.ef_searches.split(",")],
        }
        summary["hnsw"] = run_child("ann", hn, hq, args, work, json.dumps(hs))
        summary["hnsw"].pop("positions")  # type: ignore[attr-defined]
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
