"""``lancer encode``: a Ray actor pool encodes a corpus, shard by shard, into an :class:`EmbeddingStore`.

One actor per GPU (each with ``num_gpus=1``), CPU actors with ``cpus_per_worker`` CPUs each otherwise. Each actor
loads the encoder once, then takes one shard at a time: reads its byte range of ``corpus.jsonl``, encodes, and writes
the shard atomically. The driver hands out shards as actors free up (no static split: slow workers take fewer).

Fault tolerance: when an actor dies (node lost, OOM-kill, ``ray.kill``), its in-flight shard goes back to the queue
and a replacement actor is started (up to ``max_worker_restarts``); nothing of the dead actor's shard was renamed
into place, and finished shards are never redone, so every passage ends up encoded exactly once. Re-running a
finished or interrupted job skips the shards already on disk.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lancer_dist.retrieval.encoder_io import EncoderSpec, load_encoder
from lancer_dist.retrieval.store import (
    FORMAT,
    ShardPlan,
    plan_shards,
    read_corpus_range,
    shard_done,
    write_json_atomic,
    write_shard,
)

__all__ = ["EncodeJob", "EncodeResult", "encode_corpus", "encode_corpus_local", "encode_shard"]


def encode_shard(encoder: Any, plan: ShardPlan, out_dir: str | Path, dtype: str, batch_size: int) -> dict[str, Any]:
    """Encode one shard with a loaded encoder and write it; returns its statistics."""
    t0 = time.perf_counter()
    ids, texts, langs = read_corpus_range(plan)
    emb = encoder.encode(texts, is_query=False, batch_size=batch_size)
    write_shard(Path(out_dir), plan.index, ids, langs, emb.astype(np.dtype(dtype)))
    return {"shard": plan.index, "count": len(ids), "dim": int(emb.shape[1]), "seconds": time.perf_counter() - t0}


class EncodeWorker:
    """The Ray actor body (wrapped with ``ray.remote`` at run time, with the job's resources)."""

    def __init__(self, spec: dict[str, Any], num_threads: int, device: str | None):
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.encoder = load_encoder(EncoderSpec(**spec), device)

    def pid(self) -> int:
        return os.getpid()

    def encode(self, plan: dict[str, Any], out_dir: str, dtype: str, batch_size: int) -> dict[str, Any]:
        res = encode_shard(self.encoder, ShardPlan(**plan), out_dir, dtype, batch_size)
        res["pid"] = os.getpid()
        return res


@dataclass
class EncodeResult:
    out_dir: Path
    num_passages: int
    num_shards: int
    encoded_shards: int
    skipped_shards: int
    worker_failures: int
    seconds: float
    manifest: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def passages_per_second(self) -> float:
        encoded = sum(s["count"] for s in self.manifest.get("shards", []) if s.get("encoded_now"))
        return encoded / self.seconds if self.seconds > 0 else math.nan


def _job_manifest(
    spec: EncoderSpec, corpus: Path, shard_size: int, dtype: str, plans: list[ShardPlan]
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "complete": False,
        "model": spec.to_dict(),
        "corpus": str(corpus),
        "corpus_bytes": corpus.stat().st_size,
        "shard_size": shard_size,
        "dtype": dtype,
        "dim": None,
        "num_passages": sum(p.count for p in plans),
        "shards": [{**p.to_dict(), "attempts": 0} for p in plans],
    }


def _check_resumable(out_dir: Path, new: dict[str, Any]) -> None:
    """Refuse to mix shards of a different model, corpus, dtype or shard size in one directory."""
    import json

    mf = out_dir / "manifest.json"
    if not mf.is_file():
        return
    old = json.loads(mf.read_text())
    for key in ("model", "corpus", "corpus_bytes", "shard_size", "dtype"):
        if old.get(key) != new.get(key):
            raise ValueError(
                f"{mf}: field '{key}' is {old.get(key)!r} but this job has {new.get(key)!r}; "
                f"use a new output directory (or delete {out_dir}) to re-encode"
            )


def _prepare(
    spec: EncoderSpec, corpus_path: str | Path, out_dir: str | Path, shard_size: int, dtype: str
) -> tuple[Path, list[ShardPlan], dict[str, Any], list[ShardPlan]]:
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
    corpus = Path(corpus_path)
    if corpus.is_dir():
        corpus = corpus / "corpus.jsonl"
    if not corpus.is_file():
        raise FileNotFoundError(f"corpus file {corpus} does not exist")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plans = plan_shards(corpus, shard_size)
    manifest = _job_manifest(spec, corpus, shard_size, dtype, plans)
    _check_resumable(out, manifest)
    write_json_atomic(out / "manifest.json", manifest)
    todo = [p for p in plans if not shard_done(out, p)]
    return out, plans, manifest, todo


def _finish(out: Path, manifest: dict[str, Any], plans: list[ShardPlan]) -> None:
    for p in plans:
        if not shard_done(out, p):
            raise RuntimeError(f"{out}: shard {p.index} missing after the job finished")
    if plans:
        manifest["dim"] = int(np.load(out / f"emb-{plans[0].index:05d}.npy", mmap_mode="r").shape[1])
    manifest["complete"] = True
    write_json_atomic(out / "manifest.json", manifest)


def _progress(total: int, initial: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="passage", unit_scale=True, desc="encode", disable=not enabled)


def encode_corpus_local(
    spec: EncoderSpec,
    corpus_path: str | Path,
    out_dir: str | Path,
    *,
    shard_size: int = 20000,
    dtype: str = "float32",
    batch_size: int = 64,
    progress: bool = True,
    encoder: Any = None,
) -> EncodeResult:
    """The same job in this process without Ray (a plain loop; the reference the benchmark compares against)."""
    t0 = time.perf_counter()
    out, plans, manifest, todo = _prepare(spec, corpus_path, out_dir, shard_size, dtype)
    enc = encoder if encoder is not None else load_encoder(spec)
    done_before = sum(p.count for p in plans) - sum(p.count for p in todo)
    with _progress(manifest["num_passages"], done_before, progress) as bar:
        for p in todo:
            res = encode_shard(enc, p, out, dtype, batch_size)
            manifest["shards"][p.index]["attempts"] += 1
            manifest["shards"][p.index]["encoded_now"] = True
            bar.update(res["count"])
    _finish(out, manifest, plans)
    return EncodeResult(out, manifest["num_passages"], len(plans), len(todo), len(plans) - len(todo), 0,
                        time.perf_counter() - t0, manifest)


class EncodeJob:
    """A running Ray encoding job. ``pids`` maps worker slot -> actor process id, ``in_flight`` slot -> shard index
    (public so that tests and monitors can see, or kill, the workers)."""

    def __init__(
        self,
        spec: EncoderSpec,
        corpus_path: str | Path,
        out_dir: str | Path,
        *,
        shard_size: int = 20000,
        num_workers: int = 0,
        cpus_per_worker: int = 1,
        gpus_per_worker: float | None = None,
        dtype: str = "float32",
        batch_size: int = 64,
        max_worker_restarts: int = 3,
        max_attempts_per_shard: int = 3,
        progress: bool = True,
    ):
        self.spec = spec
        self.corpus_path = corpus_path
        self.out_dir = out_dir
        self.shard_size = shard_size
        self.num_workers = num_workers
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.dtype = dtype
        self.batch_size = batch_size
        self.max_worker_restarts = max_worker_restarts
        self.max_attempts_per_shard = max_attempts_per_shard
        self.progress = progress
        self.pids: dict[int, int] = {}
        self.in_flight: dict[int, int] = {}
        self.worker_failures = 0

    def _resources(self) -> tuple[int, float]:
        """(number of actors, GPUs per actor): one actor per GPU when the cluster has GPUs."""
        import ray

        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        per_gpu = self.gpus_per_worker if self.gpus_per_worker is not None else (1.0 if gpus >= 1 else 0.0)
        if self.num_workers > 0:
            n = self.num_workers
        elif per_gpu > 0:
            n = max(1, int(gpus // per_gpu))
        else:
            n = max(1, int(cpus // max(1, self.cpus_per_worker)))
        return n, per_gpu

    def run(self, on_shard_done: Callable[[EncodeJob, dict[str, Any]], None] | None = None) -> EncodeResult:
        import ray
        from ray.exceptions import RayActorError, WorkerCrashedError

        t0 = time.perf_counter()
        out, plans, manifest, todo = _prepare(self.spec, self.corpus_path, self.out_dir, self.shard_size, self.dtype)
        if not ray.is_initialized():
            ray.init()
        n_workers, per_gpu = self._resources()
        n_workers = min(n_workers, len(todo))
        remote_cls = ray.remote(EncodeWorker).options(  # type: ignore[attr-defined]
            num_cpus=self.cpus_per_worker, num_gpus=per_gpu, max_restarts=0
        )
        actors: dict[int, Any] = {}
        restarts = 0

        def start(slot: int) -> None:
            device = "cuda" if per_gpu > 0 else "cpu"
            actor = remote_cls.remote(self.spec.to_dict(), self.cpus_per_worker, device)
            actors[slot] = actor
            self.pids[slot] = ray.get(actor.pid.remote())  # also waits until the model is loaded

        queue: deque[ShardPlan] = deque(todo)
        refs: dict[Any, tuple[int, ShardPlan]] = {}

        def submit(slot: int) -> None:
            if queue:
                p = queue.popleft()
                manifest["shards"][p.index]["attempts"] += 1
                refs[actors[slot].encode.remote(p.to_dict(), str(out), self.dtype, self.batch_size)] = (slot, p)
                self.in_flight[slot] = p.index
            else:
                self.in_flight.pop(slot, None)

        done_before = manifest["num_passages"] - sum(p.count for p in todo)
        try:
            for slot in range(n_workers):
                start(slot)
            for slot in range(n_workers):
                submit(slot)
            with _progress(manifest["num_passages"], done_before, self.progress) as bar:
                while refs:
                    ready, _ = ray.wait(list(refs), num_returns=1)
                    slot, plan = refs.pop(ready[0])
                    try:
                        res = ray.get(ready[0])
                    except (RayActorError, WorkerCrashedError) as e:
                        # The worker died with the shard in flight: requeue it and replace the worker.
                        self.worker_failures += 1
                        self.in_flight.pop(slot, None)
                        actors.pop(slot, None)
                        if manifest["shards"][plan.index]["attempts"] >= self.max_attempts_per_shard:
                            raise RuntimeError(
                                f"shard {plan.index} of {plan.path} (lines {plan.first_line}..) failed "
                                f"{self.max_attempts_per_shard} times; last error: {e}"
                            ) from e
                        queue.appendleft(plan)
                        if restarts < self.max_worker_restarts:
                            restarts += 1
                            start(slot)
                            submit(slot)
                        elif not actors:
                            raise RuntimeError(f"every encoding worker died ({self.worker_failures} failures)") from e
                        else:  # continue with the remaining workers; make sure an idle one picks the shard up
                            for s in actors:
                                if s not in self.in_flight:
                                    submit(s)
                        continue
                    manifest["shards"][plan.index]["encoded_now"] = True
                    bar.update(res["count"])
                    submit(slot)
                    if on_shard_done is not None:
                        on_shard_done(self, res)
        finally:
            for actor in actors.values():
                ray.kill(actor)
        _finish(out, manifest, plans)
        return EncodeResult(out, manifest["num_passages"], len(plans), len(todo), len(plans) - len(todo),
                            self.worker_failures, time.perf_counter() - t0, manifest)


def encode_corpus(
    spec: EncoderSpec,
    corpus_path: str | Path,
    out_dir: str | Path,
    **kwargs: Any,
) -> EncodeResult:
    """Encode ``corpus_path`` (a BEIR dir or corpus.jsonl) into ``out_dir`` with a Ray actor pool; see
    :class:`EncodeJob` for the keyword arguments. Starts a local Ray instance if none is running."""
    on_shard_done = kwargs.pop("on_shard_done", None)
    return EncodeJob(spec, corpus_path, out_dir, **kwargs).run(on_shard_done)
