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

import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lancer_dist import fileio
from lancer_dist.fileio import atomic_write_json
from lancer_dist.retrieval.encoder_io import EncoderSpec, load_encoder
from lancer_dist.retrieval.ray_utils import ensure_ray
from lancer_dist.retrieval.store import (
    FORMAT,
    ShardPlan,
    plan_shards,
    read_corpus_range,
    shard_done,
    write_shard,
)

log = logging.getLogger(__name__)

__all__ = ["EncodeResult", "EncoderPool", "encode_corpus", "encode_corpus_local", "encode_shard"]


def encode_shard(
    encoder: Any, plan: ShardPlan, out_dir: str | Path, dtype: str, batch_size: int
) -> dict[str, Any]:
    """Encode one shard with a loaded encoder and write it; returns its statistics."""
    t0 = time.perf_counter()
    skipped: list[str] = []
    ids, texts, langs = read_corpus_range(plan, skipped)
    if texts:
        emb = encoder.encode(texts, is_query=False, batch_size=batch_size)
    else:
        emb = np.zeros((0, encoder.dim), np.float32)
    write_shard(Path(out_dir), plan.index, ids, langs, emb.astype(np.dtype(dtype)), skipped)
    return {
        "shard": plan.index,
        "count": plan.count,  # corpus lines of the shard (progress)
        "rows": len(ids),
        "skipped_no_text": len(skipped),
        "dim": int(emb.shape[1]),
        "seconds": time.perf_counter() - t0,
    }


def _resources(res: dict[str, float]) -> str:
    """Ray's CPU / GPU counts as "2 CPU, 0 GPU" (the resources an encoding actor asks for)."""
    return f"{res.get('CPU', 0.0):g} CPU, {res.get('GPU', 0.0):g} GPU"


def _rss_mb() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MB: its resident memory now and at its peak. ``VmHWM`` rather than
    ``ru_maxrss``, which Linux carries over from the parent process across fork + exec."""
    import resource

    vals: dict[str, float] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "VmHWM"):
                    vals[key] = int(line.split()[1]) / 1024.0
    except OSError:  # not Linux
        pass
    peak = vals.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    return vals.get("VmRSS", peak), peak


class EncodeWorker:
    """The Ray actor body (wrapped with ``ray.remote`` at run time, with the job's resources)."""

    def __init__(self, spec: EncoderSpec, num_threads: int, device: str | None):
        # Cheap on purpose: the pool times how long Ray takes to place and start the actor (pid()) apart from
        # loading the model (load()), which may take long for a large model on a slow file system.
        self.spec, self.num_threads, self.device = spec, num_threads, device
        self.encoder: Any = None

    def pid(self) -> int:
        return os.getpid()

    def load(self) -> int:
        import torch

        torch.set_num_threads(max(1, self.num_threads))
        self.encoder = load_encoder(self.spec, self.device)
        return os.getpid()

    def encode(self, plan: dict[str, Any], out_dir: str, dtype: str, batch_size: int) -> dict[str, Any]:
        res = encode_shard(self.encoder, ShardPlan(**plan), out_dir, dtype, batch_size)
        res["pid"] = os.getpid()
        # This actor's resident memory now and its peak so far (MB): flat in corpus size, bounded by one shard's
        # texts / embeddings (nothing is kept between shards) and the largest batch's activations.
        res["rss_mb"], res["peak_rss_mb"] = _rss_mb()
        return res

    def encode_texts(self, texts: list[str], is_query: bool, batch_size: int) -> np.ndarray:
        return np.asarray(self.encoder.encode(texts, is_query=is_query, batch_size=batch_size))


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
    atomic_write_json(out / "manifest.json", manifest)
    todo = [p for p in plans if not shard_done(out, p)]
    return out, plans, manifest, todo


def _finish(out: Path, manifest: dict[str, Any], plans: list[ShardPlan]) -> None:
    for p in plans:
        if not shard_done(out, p):
            raise RuntimeError(f"{out}: shard {p.index} missing after the job finished")
    # Rows actually stored per shard (passages without any text are left out and counted, as read_beir does).
    skipped_total = 0
    for p in plans:
        meta = json.loads((out / f"ids-{p.index:05d}.json").read_text())
        manifest["shards"][p.index]["rows"] = len(meta["ids"])
        skipped_total += len(meta.get("skipped", []))
    manifest["num_passages"] = sum(s["rows"] for s in manifest["shards"])
    manifest["skipped_no_text"] = skipped_total
    if skipped_total:
        log.warning(
            "%s: %d passages without text were skipped (ids in ids-*.json 'skipped')", out, skipped_total
        )
    if plans:
        manifest["dim"] = int(np.load(out / f"emb-{plans[0].index:05d}.npy", mmap_mode="r").shape[1])
    manifest["complete"] = True
    atomic_write_json(out / "manifest.json", manifest)


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
    with fileio.progress(
        "encode", "passage", manifest["num_passages"], done_before, progress, unit_scale=True
    ) as bar:
        for p in todo:
            res = encode_shard(enc, p, out, dtype, batch_size)
            manifest["shards"][p.index]["attempts"] += 1
            manifest["shards"][p.index]["encoded_now"] = True
            bar.update(res["count"])
    _finish(out, manifest, plans)
    return EncodeResult(
        out,
        manifest["num_passages"],
        len(plans),
        len(todo),
        len(plans) - len(todo),
        0,
        time.perf_counter() - t0,
        manifest,
    )


class EncoderPool:
    """A pool of Ray encoder actors for one model, reused across jobs (collections, queries): each actor loads the
    model once. ``pids`` maps worker slot -> actor process id and ``in_flight`` slot -> shard index of the running
    job (public so that tests and monitors can see, or kill, the workers).

    Use as a context manager, or call :meth:`close` (kills the actors)."""

    def __init__(
        self,
        spec: EncoderSpec,
        *,
        num_workers: int = 0,
        cpus_per_worker: int = 1,
        gpus_per_worker: float | None = None,
        max_worker_restarts: int = 3,
        max_attempts_per_shard: int = 3,
        ray_address: str = "",
        start_timeout_s: float = 600.0,
    ):
        import ray

        self.spec = spec
        self.start_timeout_s = start_timeout_s
        self.max_worker_restarts = max_worker_restarts
        self.max_attempts_per_shard = max_attempts_per_shard
        self.started_ray = ensure_ray(ray_address)
        gpus = float(ray.cluster_resources().get("GPU", 0.0))
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        # One actor per GPU when the cluster has GPUs, else CPU actors of ``cpus_per_worker`` CPUs each.
        self.gpus_per_worker = gpus_per_worker if gpus_per_worker is not None else (1.0 if gpus >= 1 else 0.0)
        if cpus_per_worker == 0:
            # Auto: the cluster's CPUs split evenly over the requested workers (workers x threads = cores), or
            # one single-threaded worker per CPU (measured faster than fewer multi-threaded ones: docs/evaluation.md).
            cpus_per_worker = max(1, int(cpus // num_workers)) if num_workers > 0 else 1
        self.cpus_per_worker = cpus_per_worker
        if num_workers > 0:
            self.num_workers = num_workers
        elif self.gpus_per_worker > 0:
            self.num_workers = max(1, int(gpus // self.gpus_per_worker))
        else:
            self.num_workers = max(1, int(cpus // max(1, cpus_per_worker)))
        self._remote = ray.remote(EncodeWorker).options(  # type: ignore[attr-defined]
            num_cpus=cpus_per_worker, num_gpus=self.gpus_per_worker, max_restarts=0
        )
        self.actors: dict[int, Any] = {}
        self.pids: dict[int, int] = {}
        self.in_flight: dict[int, int] = {}
        self.worker_failures = 0
        self.restarts = 0
        for slot in range(self.num_workers):
            self._create(slot)
        self._wait_ready(list(self.actors))

    def _create(self, slot: int) -> None:
        device = "cuda" if self.gpus_per_worker > 0 else "cpu"
        self.actors[slot] = self._remote.remote(self.spec, self.cpus_per_worker, device)

    def _wait_ready(self, slots: list[int]) -> None:
        """Wait until the actors of ``slots`` are placed and started, then until they have loaded the model (in
        parallel).

        An actor that cannot be placed (its CPUs / GPUs held by other work, or more asked than any node has) would
        otherwise wait for ever: after ``start_timeout_s`` the pool goes on with the actors that started, killing
        the others and logging why, or raises naming what each actor asked for and what the cluster had free when
        none started. Loading the model is not under that limit (a large model on a slow file system may take
        long); a load that fails raises."""
        import ray

        refs = {self.actors[s].pid.remote(): s for s in slots}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=self.start_timeout_s)
        late = sorted(refs[r] for r in pending)
        for slot in late:
            ray.kill(self.actors.pop(slot))
        started = [refs[r] for r in ready]
        pids = ray.get([self.actors[s].load.remote() for s in started])
        self.pids.update(dict(zip(started, pids)))
        if not late:
            return
        why = (
            f"{len(late)} of {len(slots)} encoding worker(s) did not start within {self.start_timeout_s:g} s "
            f"(each asks for {self.cpus_per_worker} CPU(s) and {self.gpus_per_worker:g} GPU(s); the cluster has "
            f"{_resources(ray.available_resources())} free of {_resources(ray.cluster_resources())})"
        )
        if not self.actors:
            raise RuntimeError(
                why + "; none is left to encode with (eval.num_workers / eval.cpus_per_worker)"
            )
        log.warning("%s; going on with %d worker(s)", why, len(self.actors))

    def _replace(self, slot: int) -> bool:
        self.actors.pop(slot, None)
        self.pids.pop(slot, None)
        if self.restarts >= self.max_worker_restarts:
            return False
        self.restarts += 1
        self._create(slot)
        self._wait_ready([slot])
        return True

    def __enter__(self) -> EncoderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        import ray

        for actor in self.actors.values():
            ray.kill(actor)
        self.actors.clear()
        self.pids.clear()

    def encode_corpus(
        self,
        corpus_path: str | Path,
        out_dir: str | Path,
        *,
        shard_size: int = 20000,
        dtype: str = "float32",
        batch_size: int = 64,
        progress: bool = True,
        on_shard_done: Callable[[EncoderPool, dict[str, Any]], None] | None = None,
    ) -> EncodeResult:
        """Encode a BEIR corpus (dir or corpus.jsonl) into an :class:`EmbeddingStore` at ``out_dir``; shards are
        handed out as workers free up; a dead worker's shard is requeued and the worker replaced."""
        import ray
        from ray.exceptions import RayActorError, WorkerCrashedError

        t0 = time.perf_counter()
        out, plans, manifest, todo = _prepare(self.spec, corpus_path, out_dir, shard_size, dtype)
        failures_before = self.worker_failures
        queue: deque[ShardPlan] = deque(todo)
        refs: dict[Any, tuple[int, ShardPlan]] = {}

        def submit(slot: int) -> None:
            if queue and slot in self.actors:
                p = queue.popleft()
                manifest["shards"][p.index]["attempts"] += 1
                refs[self.actors[slot].encode.remote(p.to_dict(), str(out), dtype, batch_size)] = (slot, p)
                self.in_flight[slot] = p.index
            else:
                self.in_flight.pop(slot, None)

        for slot in list(self.actors):
            submit(slot)
        done_before = manifest["num_passages"] - sum(p.count for p in todo)
        with fileio.progress(
            "encode", "passage", manifest["num_passages"], done_before, progress, unit_scale=True
        ) as bar:
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1)
                slot, plan = refs.pop(ready[0])
                try:
                    res = ray.get(ready[0])
                except (RayActorError, WorkerCrashedError) as e:
                    # The worker died with this shard in flight: nothing of it was renamed into place.
                    self.worker_failures += 1
                    self.in_flight.pop(slot, None)
                    if manifest["shards"][plan.index]["attempts"] >= self.max_attempts_per_shard:
                        raise RuntimeError(
                            f"shard {plan.index} of {plan.path} (from line {plan.first_line}) failed "
                            f"{self.max_attempts_per_shard} times; last error: {e}"
                        ) from e
                    queue.appendleft(plan)
                    if self._replace(slot):
                        submit(slot)
                    elif not self.actors:
                        raise RuntimeError(
                            f"every encoding worker died ({self.worker_failures} failures)"
                        ) from e
                    else:  # carry on with fewer workers; an idle one picks the shard up
                        for s in list(self.actors):
                            if s not in self.in_flight:
                                submit(s)
                    continue
                manifest["shards"][plan.index]["encoded_now"] = True
                bar.update(res["count"])
                submit(slot)
                if on_shard_done is not None:
                    on_shard_done(self, res)
        self.in_flight.clear()
        _finish(out, manifest, plans)
        return EncodeResult(
            out,
            manifest["num_passages"],
            len(plans),
            len(todo),
            len(plans) - len(todo),
            self.worker_failures - failures_before,
            time.perf_counter() - t0,
            manifest,
        )

    def encode_texts(self, texts: list[str], is_query: bool, batch_size: int = 64) -> np.ndarray:
        """Encode in-memory texts (queries) split evenly over the workers; [N, D] float32 in input order."""
        import ray

        if not texts:
            raise ValueError("encode_texts needs at least one text")
        slots = list(self.actors)
        chunks = np.array_split(np.arange(len(texts)), len(slots))
        refs = [
            self.actors[s].encode_texts.remote([texts[i] for i in idx], is_query, batch_size)
            for s, idx in zip(slots, chunks)
            if len(idx)
        ]
        return np.concatenate(ray.get(refs))


def encode_corpus(
    spec: EncoderSpec,
    corpus_path: str | Path,
    out_dir: str | Path,
    *,
    num_workers: int = 0,
    cpus_per_worker: int = 1,
    gpus_per_worker: float | None = None,
    ray_address: str = "",
    start_timeout_s: float = 600.0,
    **kwargs: Any,
) -> EncodeResult:
    """Encode ``corpus_path`` (a BEIR dir or corpus.jsonl) into ``out_dir`` with a temporary :class:`EncoderPool`
    (see :meth:`EncoderPool.encode_corpus` for the keyword arguments). Starts a local Ray instance if none runs."""
    with EncoderPool(
        spec,
        num_workers=num_workers,
        cpus_per_worker=cpus_per_worker,
        gpus_per_worker=gpus_per_worker,
        ray_address=ray_address,
        start_timeout_s=start_timeout_s,
    ) as pool:
        return pool.encode_corpus(corpus_path, out_dir, **kwargs)
