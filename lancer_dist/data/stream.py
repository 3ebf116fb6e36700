"""Training streams over webdataset shards: global batches independent of the world size, exact language balance,
whole retrieval groups, exact resume on any number of ranks and workers.

What one training step holds (all ranks together): a function of the seed, the shards and the step alone
------------------------------------------------------------------------------------------------------------
Each language (and the retrieval data) is one *global sub-stream*: an infinite, deterministic record sequence (per
epoch: the shards permuted with a seed shared by everyone, read in that order, mixed by a seeded shuffle buffer that
is flushed at the epoch end; epochs follow each other, reshuffled). Global step ``t`` takes the next
``m = data.erasure.passages_per_language`` records of every language sub-stream and the next
``Q = data.retrieval.queries_per_step`` groups of the retrieval sub-stream, so the sequence of global batches does
not depend on the world size ``W`` or on ``data.num_workers`` (Megatron-LM's samplers do the same).

* Erasure passages: the ``m * n`` global slots are laid out language-interleaved (slot ``j`` holds occurrence
  ``j // n`` of language ``j % n``) and rank ``r`` takes the contiguous block ``[r * m*n/W, (r+1) * m*n/W)``
  (:func:`erasure_layout`): exactly ``m`` passages per language per global step, an equal share per rank.
* Retrieval groups: rank ``r`` takes groups ``[r * Q/W, (r+1) * Q/W)`` of the step, whole; each group is 1 positive
  and ``G - 1`` negatives drawn (seeded by the group key and the epoch) from the negatives stored in the shard.
* Concatenating the ranks' slices in rank order gives the one-process batch (tested for 1, 2 and 3 ranks, 0 and 2
  workers), so with the global-batch losses N ranks train exactly like one process.

Who reads what
--------------
Every (rank, loader worker) reads the global sequences itself and keeps its slice: worker ``k`` of
``K = max(1, num_workers)`` builds the steps ``t = k (mod K)`` (the DataLoader hands batches out round-robin, so they
arrive in step order); it walks over the other steps without tokenising. Reading (parsing tar members) is repeated
by every reader, tokenisation (the costly part) is not: each rank tokenises only its slice. Memory is bounded by
one shard (one tar member for shards at a URL, streamed through webdataset) plus the shuffle buffer per sub-stream
and reader.

Why resume is exact, on any world size
--------------------------------------
A sub-stream's position is ``(epoch, records consumed in the epoch)``. After global step ``t`` every reader of
every rank has consumed exactly the same records, so the state after step ``t`` (the step count, every
sub-stream's position and the skip counters) is *global*: one file, the same on every rank. Restoring replays each
sub-stream's epoch from its start (deterministic; no tokenisation) and drops what was consumed; any number of ranks
and workers then re-slice the following steps. The main process records the state attached to each batch it hands
out, so :meth:`TrainStream.state_dict` describes exactly the batches consumed, never the ones the workers
prefetched. Without a state, ``start_step=s`` replays from step 0 (slower, same result). Skip counters count each
bad record once per epoch for the whole run (every reader sees the same sequence), not once per rank.

Webdataset supplies the tar format, writing, opening URLs (``http(s)://``, ``file://``, ``pipe:``) and member
parsing (:mod:`lancer_dist.data.shards`); its pipeline
(``WebDataset(...).shuffle().with_epoch()``) is not used for the order because its shuffle and split state cannot be
saved and its per-worker epoch counts do not give per-language exactness.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lancer_dist.config import ConfigError, DataConfig, RunConfig
from lancer_dist.data.collate import Collator, passage_text
from lancer_dist.data.errors import DataError, SkipCounter
from lancer_dist.data.shards import (
    Manifest,
    ShardInfo,
    check_group,
    check_passage,
    load_shard,
    read_manifest,
    stream_shard,
)

__all__ = ["StreamPlan", "SubStream", "TrainBatch", "TrainStream", "check_world_size", "erasure_layout"]

STATE_FORMAT = 2


def _seed(*parts: Any) -> int:
    """A 64-bit seed from any JSON-able parts (stable across processes and Python runs, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).digest(), "little")


def erasure_layout(num_languages: int, per_language: int, world_size: int, rank: int) -> list[int]:
    """Language index of each erasure slot of ``rank`` for one step: ``[m*n / W]`` ints.

    Over all ranks the slots are ``0 .. m*n-1`` with language ``j % n``: exactly ``m`` of each language.
    """
    total = num_languages * per_language
    if total % world_size:
        raise ConfigError(
            "data.erasure.passages_per_language",
            per_language,
            f"passages_per_language x {num_languages} languages = {total} divisible by the world size {world_size}",
        )
    share = total // world_size
    return [j % num_languages for j in range(rank * share, (rank + 1) * share)]


@dataclass
class TrainBatch:
    """One rank's share of one global step. Passages are group-major with the positive first."""

    step: int
    query_input_ids: Tensor  # [B_r, Tq]
    query_attention_mask: Tensor  # [B_r, Tq]
    passage_input_ids: Tensor  # [B_r * G, Tp]
    passage_attention_mask: Tensor  # [B_r * G, Tp]
    erasure_input_ids: Tensor  # [M_r, Tp]
    erasure_attention_mask: Tensor  # [M_r, Tp]
    erasure_languages: Tensor  # [M_r] long ids into TrainStream.languages
    # Shard keys / docids in tensor row order: provenance, and the document ids of false-negative masking
    # (``loss.mask_false_negatives``); "" = a passage stored without an id (never masked).
    query_keys: list[str] = field(default_factory=list)
    passage_docids: list[str] = field(default_factory=list)
    erasure_keys: list[str] = field(default_factory=list)
    # [B_r] every stored positive's docid of each query's group (not only the one sampled into the batch).
    query_positive_docids: list[list[str]] = field(default_factory=list)

    def shard(self, rank: int, world_size: int) -> TrainBatch:
        """Rank ``rank``'s share of this batch when it holds a whole global step: a contiguous block of queries (with
        their passage groups) and of erasure slots, the rows that ``TrainStream(..., rank, world_size)`` yields.
        Used to feed one global batch to N ranks (exactness tests, benchmarks)."""
        import dataclasses

        b, m = len(self.query_input_ids), len(self.erasure_input_ids)
        if b % world_size or m % world_size:
            raise ValueError(f"{b} queries / {m} erasure passages do not split over {world_size} ranks")
        g = len(self.passage_input_ids) // b
        qs, xs = (
            slice(rank * b // world_size, (rank + 1) * b // world_size),
            slice(rank * m // world_size, (rank + 1) * m // world_size),
        )
        ps = slice(qs.start * g, qs.stop * g)
        rows = {"query_": qs, "passage_": ps, "erasure_": xs}
        tensors = {
            k: getattr(self, k)[next(v for p, v in rows.items() if k.startswith(p))] for k in _BATCH_TENSORS
        }
        return dataclasses.replace(
            self,
            **tensors,
            query_keys=self.query_keys[qs],
            passage_docids=self.passage_docids[ps],
            query_positive_docids=self.query_positive_docids[qs],
            erasure_keys=self.erasure_keys[xs],
        )

    def pin_memory(self) -> TrainBatch:
        """Page-locked copies of the tensors (what a DataLoader's ``pin_memory`` calls), so that
        ``to(cuda, non_blocking=True)`` is an asynchronous copy."""
        import dataclasses

        return dataclasses.replace(self, **{k: getattr(self, k).pin_memory() for k in _BATCH_TENSORS})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TrainBatch:
        """The batch with every tensor on ``device`` (the trainer's one place that moves batches)."""
        import dataclasses

        moved = {k: getattr(self, k).to(device, non_blocking=non_blocking) for k in _BATCH_TENSORS}
        return dataclasses.replace(self, **moved)


_BATCH_TENSORS = (
    "query_input_ids",
    "query_attention_mask",
    "passage_input_ids",
    "passage_attention_mask",
    "erasure_input_ids",
    "erasure_attention_mask",
    "erasure_languages",
)


# --------------------------------------------------------------------------------------------------------------
# Sub-streams
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _SubSpec:
    name: str  # "erasure/<lang>" or "retrieval"
    manifest: Manifest
    shards: tuple[ShardInfo, ...]
    lang: str | None  # erasure sub-streams: their language
    # erasure: for each shard, the configured language that owns (counts) its records with a bad/unknown language
    owner: dict[str, str] = field(default_factory=dict)
    configured: frozenset[str] = frozenset()


def _lang_of(rec: Any) -> Any:
    return rec.get("lang") if isinstance(rec, dict) else None


class SubStream:
    """One slot's infinite, deterministic record sequence of one sub-stream (see the module docstring).

    The training stream reads the global sequence (slot 0 of 1) in every reader. With ``num_slots`` S > 1 the
    epoch's records are partitioned among S slots (by shard when there are enough shards, else by record stride);
    that partition is kept for readers that want a disjoint share of one epoch and is tested, not used by
    :class:`TrainStream`.

    Bad records raise :class:`DataError`, or with ``skip_bad`` are counted in ``counter``. Each bad record or shard
    is counted by exactly one slot per epoch.
    """

    def __init__(
        self,
        spec: _SubSpec,
        slot: int,
        num_slots: int,
        *,
        seed: int,
        shuffle_buffer: int,
        skip_bad: bool,
        counter: SkipCounter,
        group_size: int = 1,
    ) -> None:
        if not 0 <= slot < num_slots:
            raise ValueError(f"slot {slot} not in [0, {num_slots})")
        self.spec = spec
        self.slot = slot
        self.num_slots = num_slots
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.skip_bad = skip_bad
        self.counter = counter
        self.group_size = group_size
        self.known = frozenset(spec.manifest.totals)
        self.epoch = 0
        self.consumed = 0
        self._it: Iterator[tuple[str, Any, int]] | None = None

    # -- the record sequence of one epoch ------------------------------------------------------------------------

    def _attributed(self, shard: ShardInfo, rec: Any) -> bool:
        """Is this record this sub-stream's business (to yield, or to report as bad)?"""
        if self.spec.lang is None:
            return True
        lang = rec.get("lang") if isinstance(rec, dict) else None
        if isinstance(lang, str) and lang in self.spec.configured:
            return lang == self.spec.lang
        if isinstance(lang, str) and lang in self.known:
            return False  # a valid record of a language this run does not use
        return (
            self.spec.owner.get(shard.name) == self.spec.lang
        )  # bad language: reported by the shard's owner

    def _validate(self, where: str, key: str, rec: Any) -> None:
        if self.spec.lang is not None:
            check_passage(where, key, rec, self.known)
            return
        check_group(where, key, rec)
        need = self.group_size - 1
        if len(rec["negatives"]) < need:
            raise DataError(
                where,
                key,
                "negatives",
                f"{len(rec['negatives'])} negatives, group_size {self.group_size} needs {need}",
                reason="too_few_negatives",
            )

    def _shard_records(self, where: str, shard: ShardInfo) -> Iterator[tuple[str, Any]]:
        """A shard's records, checked against the manifest (:class:`DataError` when a check fails). Local shards
        are read whole first (all checks before the first record); shards at a URL are streamed member by member
        through webdataset (:func:`stream_shard`), the checksum, count and per-language checks coming at the end."""
        m = self.spec.manifest
        if not m.remote:
            records = load_shard(m, shard)
            self._check_languages(where, shard, Counter(_lang_of(r) for _, r in records))
            yield from records
            return
        langs: Counter[Any] = Counter()
        for key, rec in stream_shard(m, shard):
            langs[_lang_of(rec)] += 1
            yield key, rec
        self._check_languages(where, shard, langs)

    def _check_languages(self, where: str, shard: ShardInfo, langs: Counter[Any]) -> None:
        # Per-language counts are compared only when every record carries a known language; records with a bad
        # language are reported one by one instead (not twice).
        if self.spec.lang is None:
            return
        all_known = all(isinstance(k, str) and k in self.known for k in langs)
        if all_known and dict(langs) != {k: v for k, v in shard.languages.items() if v}:
            raise DataError(
                where,
                None,
                "languages",
                f"shard holds {dict(langs)}, manifest says {shard.languages}",
                reason="manifest_mismatch",
            )

    def _epoch_records(self, epoch: int) -> Iterator[tuple[str, Any, int]]:
        shards = list(self.spec.shards)
        if self.shuffle_buffer > 0:
            random.Random(_seed(self.seed, self.spec.name, "shards", epoch)).shuffle(shards)
        split = len(shards) >= self.num_slots
        mine = shards[self.slot :: self.num_slots] if split else shards
        position = 0  # record position among this sub-stream's records, for the stride split
        for shard in mine:
            where = f"{shard.name} (in {self.spec.manifest.root})"
            reports_shard = split or self.slot == 0
            records = self._shard_records(where, shard)
            while True:
                try:
                    key, rec = next(records)
                except StopIteration:
                    break
                except DataError as e:
                    if not self.skip_bad:
                        raise
                    if reports_shard:
                        self.counter.skip(e, shard_level=True)
                    break
                if not self._attributed(shard, rec):
                    continue
                if not split:
                    position += 1
                    if (position - 1) % self.num_slots != self.slot:
                        continue
                try:
                    self._validate(where, key, rec)
                except DataError as e:
                    if not self.skip_bad:
                        raise
                    self.counter.skip(e)
                    continue
                yield key, rec, epoch

    def _shuffled(self, epoch: int) -> Iterator[tuple[str, Any, int]]:
        source = self._epoch_records(epoch)
        size = self.shuffle_buffer
        if size <= 1:
            yield from source
            return
        rng = random.Random(_seed(self.seed, self.spec.name, "buffer", self.slot, self.num_slots, epoch))
        buf: list[tuple[str, Any, int]] = []
        for item in source:
            if len(buf) < size:
                buf.append(item)
                continue
            k = rng.randrange(size)
            out, buf[k] = buf[k], item
            yield out
        rng.shuffle(buf)
        yield from buf

    # -- position ------------------------------------------------------------------------------------------------

    def next(self) -> tuple[str, Any, int]:
        """The next ``(key, record, epoch)``; moves on to the next epoch when one ends."""
        while True:
            if self._it is None:
                self._it = self._shuffled(self.epoch)
            try:
                item = next(self._it)
            except StopIteration:
                if self.consumed == 0:
                    raise DataError(
                        self.spec.name,
                        None,
                        "<stream>",
                        f"slot {self.slot} of {self.num_slots} found no usable record in epoch {self.epoch} "
                        f"(skipped so far: {self.counter.as_dict()})",
                        reason="no_records",
                    ) from None
                self.epoch += 1
                self.consumed = 0
                self._it = None
                continue
            self.consumed += 1
            return item

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def restore(self, st: dict[str, int]) -> None:
        """Replay epoch ``st["epoch"]`` and drop its first ``st["consumed"]`` records."""
        self.epoch, self.consumed, self._it = int(st["epoch"]), 0, self._shuffled(int(st["epoch"]))
        for _ in range(int(st["consumed"])):
            try:
                next(self._it)
            except StopIteration:
                raise ValueError(
                    f"stream state for {self.spec.name} (slot {self.slot}) is past the end of epoch {self.epoch}: "
                    "the shards changed since the state was saved"
                ) from None
            self.consumed += 1


# --------------------------------------------------------------------------------------------------------------
# The plan (picklable; sent to DataLoader workers) and the global-step reader
# --------------------------------------------------------------------------------------------------------------


@dataclass
class StreamPlan:
    """What defines the global batches (seed, languages, per-step counts, shards) plus which slice is this rank's."""

    rank: int
    world_size: int
    num_roles: int
    seed: int
    shuffle_buffer: int
    skip_bad: bool
    group_size: int
    queries_per_step: int  # Q: retrieval groups per global step (0 without retrieval data)
    per_language: int  # m: erasure passages per language per global step
    languages: list[str]
    erasure: Manifest | None
    retrieval: Manifest | None
    collator: Collator | None

    @property
    def erasure_slots(self) -> range:
        """This rank's global erasure slots (slot ``j`` holds occurrence ``j // n`` of language ``j % n``)."""
        if self.erasure is None:
            return range(0)
        share = len(self.languages) * self.per_language // self.world_size
        return range(self.rank * share, (self.rank + 1) * share)

    @property
    def query_slots(self) -> range:
        """This rank's positions among the ``Q`` groups of a global step."""
        q = self.queries_per_step // self.world_size
        return range(self.rank * q, (self.rank + 1) * q)

    @property
    def layout(self) -> list[int]:
        n = len(self.languages)
        return [j % n for j in self.erasure_slots]

    def erasure_spec(self, lang: str) -> _SubSpec:
        assert self.erasure is not None
        configured = frozenset(self.languages)
        shards, owner = [], {}
        for s in self.erasure.shards:
            present = [x for x in self.languages if s.languages.get(x)]
            if present:
                owner[s.name] = present[0]
            if s.languages.get(lang):
                shards.append(s)
        return _SubSpec(f"erasure/{lang}", self.erasure, tuple(shards), lang, owner, configured)


class _GlobalReader:
    """Reads the global sequence of every sub-stream, step after step, and keeps this rank's slice of the steps
    it is asked to build. Its position after step ``t`` is the same in every rank and worker: the global state."""

    def __init__(self, plan: StreamPlan) -> None:
        self.plan = plan
        self.counter = SkipCounter()
        self.subs: dict[str, SubStream] = {}
        common = {"seed": plan.seed, "shuffle_buffer": plan.shuffle_buffer, "skip_bad": plan.skip_bad}
        if plan.erasure is not None:
            for lang in plan.languages:
                spec = plan.erasure_spec(lang)
                self.subs[spec.name] = SubStream(spec, 0, 1, counter=self.counter, **common)  # type: ignore[arg-type]
        if plan.retrieval is not None and plan.queries_per_step:
            spec = _SubSpec("retrieval", plan.retrieval, tuple(plan.retrieval.shards), None)
            self.subs["retrieval"] = SubStream(
                spec,
                0,
                1,
                counter=self.counter,
                group_size=plan.group_size,
                **common,  # type: ignore[arg-type]
            )
        self.next_step = 0

    def state(self) -> dict[str, Any]:
        return {
            "next_step": self.next_step,
            "streams": {name: s.state() for name, s in self.subs.items()},
            "stats": self.counter.as_dict(),
        }

    def restore(self, st: dict[str, Any]) -> None:
        if set(st["streams"]) != set(self.subs):
            raise ValueError(
                f"stream state has sub-streams {sorted(st['streams'])}, expected {sorted(self.subs)}"
            )
        for name, sub in self.subs.items():
            sub.restore(st["streams"][name])
        # the replay re-counted the current epoch's skips; the saved counters hold every epoch's
        self.counter.load(st["stats"])
        self.next_step = int(st["next_step"])

    def _group(self, key: str, rec: dict[str, Any], epoch: int) -> list[dict[str, Any]]:
        # Seeded by the group and the epoch: the choice does not depend on which rank reads the group, and a new
        # epoch draws new negatives (as Tevatron does).
        rng = random.Random(_seed(self.plan.seed, "group", key, epoch))
        pos = rec["positives"][rng.randrange(len(rec["positives"]))]
        negs = rng.sample(rec["negatives"], self.plan.group_size - 1)
        return [pos, *negs]

    def _raw(self, step: int, materialise: bool) -> dict[str, Any]:
        """Consume global step ``step`` from every sub-stream; return this rank's slice (texts only if
        ``materialise``)."""
        if step != self.next_step:
            raise RuntimeError(f"reader asked for step {step}, its next step is {self.next_step}")
        plan = self.plan
        n, m = len(plan.languages), plan.per_language
        mine = plan.erasure_slots
        e_rows: dict[int, tuple[str, str]] = {}
        if plan.erasure is not None:
            for lang_id, lang in enumerate(plan.languages):
                sub = self.subs[f"erasure/{lang}"]
                for occ in range(m):
                    key, rec, _ = sub.next()
                    j = occ * n + lang_id
                    if j in mine:
                        e_rows[j] = (key, rec["text"])
        out: dict[str, Any] = {
            "e_keys": [],
            "e_texts": [],
            "q_keys": [],
            "q_texts": [],
            "p_ids": [],
            "p_texts": [],
            "q_pos_ids": [],
        }
        for j in mine:
            out["e_keys"].append(e_rows[j][0])
            out["e_texts"].append(e_rows[j][1])
        if "retrieval" in self.subs:
            qs = plan.query_slots
            for i in range(plan.queries_per_step):
                key, rec, epoch = self.subs["retrieval"].next()
                if i not in qs:
                    continue
                out["q_keys"].append(key)
                if materialise:
                    out["q_texts"].append(rec["query"])
                    out["q_pos_ids"].append([p["docid"] for p in rec["positives"]])
                    for p in self._group(key, rec, epoch):
                        out["p_ids"].append(p["docid"])
                        out["p_texts"].append(passage_text(p))
        self.next_step += 1
        return out

    def skip_to(self, step: int) -> None:
        """Consume (without tokenising) the global steps before ``step``."""
        while self.next_step < step:
            self._raw(self.next_step, materialise=False)

    def batch(self, step: int) -> TrainBatch:
        raw = self._raw(step, materialise=True)
        c = self.plan.collator
        assert c is not None
        q_ids, q_mask = c.queries(raw["q_texts"])
        p_ids, p_mask = c.passages(raw["p_texts"])
        e_ids, e_mask = c.passages(raw["e_texts"])
        return TrainBatch(
            step=step,
            query_input_ids=q_ids,
            query_attention_mask=q_mask,
            passage_input_ids=p_ids,
            passage_attention_mask=p_mask,
            erasure_input_ids=e_ids,
            erasure_attention_mask=e_mask,
            erasure_languages=torch.tensor(self.plan.layout, dtype=torch.long),
            query_keys=raw["q_keys"],
            passage_docids=raw["p_ids"],
            query_positive_docids=raw["q_pos_ids"],
            erasure_keys=raw["e_keys"],
        )


class _StepDataset(IterableDataset):
    """Worker ``i`` of ``K`` builds steps ``start + i, start + i + K, ...`` below ``end`` (the DataLoader's round
    robin order); yields ``(batch, global_state_after_batch)``. Every worker reads the same global sequence, so
    the number of workers changes who builds a step, never what it holds."""

    def __init__(self, plan: StreamPlan, start: int, end: int, state: dict[str, Any] | None) -> None:
        self.plan, self.start, self.end, self.state = plan, start, end, state

    def __iter__(self) -> Iterator[tuple[TrainBatch, dict[str, Any]]]:
        info = get_worker_info()
        K = self.plan.num_roles
        i = info.id if info is not None else 0
        if info is not None and info.num_workers != K:
            raise RuntimeError(f"stream planned for {K} workers, DataLoader has {info.num_workers}")
        first = self.start + i
        if first >= self.end:
            return
        reader = _GlobalReader(self.plan)
        if self.state is not None:
            reader.restore(self.state)
            if reader.next_step > first:
                raise ValueError(f"stream state is at step {reader.next_step}, after {first}")
        reader.skip_to(first)
        for step in range(first, self.end, K):
            reader.skip_to(step)
            yield reader.batch(step), reader.state()


def _ignore_preemption_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGTERM / SIGUSR1: a signal meant for the trainer (SLURM's ``scancel --signal``
    reaches every process of a job step) must not kill them mid-epoch, or the trainer dies with "DataLoader worker
    is killed by signal" instead of checkpointing. They still end when the trainer closes the loader or dies (the
    DataLoader's parent watchdog)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def _identity(x: Any) -> Any:
    return x


# --------------------------------------------------------------------------------------------------------------
# The trainer's entry point
# --------------------------------------------------------------------------------------------------------------


def _fingerprint(m: Manifest | None) -> str | None:
    if m is None:
        return None
    return hashlib.sha256("".join(s.sha256 for s in m.shards).encode()).hexdigest()[:16]


def _load(path: str, kind: str, fld: str) -> Manifest:
    try:
        m = read_manifest(path)
    except DataError as e:
        raise ConfigError(fld, path, f"a shard directory with a valid manifest.json ({e})") from e
    if m.kind != kind:
        raise ConfigError(fld, path, f"shards of kind '{kind}' (this manifest holds '{m.kind}')")
    return m


def check_world_size(d: DataConfig, world_size: int) -> None:
    """The settings that must divide among ``world_size`` ranks for the global batch to be independent of it.

    Raises a :class:`ConfigError` naming the field; cheap (reads at most the erasure manifest), so cluster front-ends and
    ``lancer train`` call it before any process group starts."""
    if d.retrieval.path and d.retrieval.queries_per_step % world_size:
        raise ConfigError(
            "data.retrieval.queries_per_step",
            d.retrieval.queries_per_step,
            f"a multiple of the world size {world_size} (each rank takes an equal slice of the global batch)",
        )
    if d.erasure.path:
        n = len(d.erasure.languages) or len(_load(d.erasure.path, "passages", "data.erasure.path").languages)
        erasure_layout(n, d.erasure.passages_per_language, world_size, 0)


class TrainStream:
    """Iterable over this rank's :class:`TrainBatch` for steps ``start_step .. num_steps - 1``, read as ``data``
    says and tokenised by ``collator`` (the trainer's one :class:`Collator`; :meth:`from_config` builds both from a
    run config). Iterating again continues where the consumed batches ended.

    Global step ``t`` is a function of the data settings, the seed and ``t`` only; rank ``r`` of ``W`` takes a
    fixed slice of it, and ``data.num_workers`` only decides which process builds it. ``state_dict()`` is the
    global position after the last batch handed out (JSON-serialisable, identical on every rank); a new stream
    with ``load_state_dict(sd)`` yields exactly the batches an uninterrupted run yields next, on any world size
    and number of workers.
    """

    def __init__(
        self,
        data: DataConfig,
        collator: Collator,
        *,
        rank: int,
        world_size: int,
        num_steps: int,
        start_step: int = 0,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        d = data
        self.rank, self.world_size = rank, world_size
        self.num_workers = d.num_workers
        self.end = num_steps
        if not 0 <= start_step <= self.end:
            raise ValueError(f"start_step {start_step} not in [0, {self.end}]")
        self._start_given = start_step
        self._next_step = start_step
        self._state: dict[str, Any] | None = None  # global state after the last batch handed out (or loaded)

        erasure = _load(d.erasure.path, "passages", "data.erasure.path") if d.erasure.path else None
        retrieval = _load(d.retrieval.path, "groups", "data.retrieval.path") if d.retrieval.path else None
        if erasure is None and retrieval is None:
            raise ConfigError("data", "", "data.erasure.path and/or data.retrieval.path")
        check_world_size(d, world_size)

        languages: list[str] = []
        if erasure is not None:
            languages = list(d.erasure.languages) or erasure.languages
            unknown = [x for x in languages if not erasure.totals.get(x)]
            if unknown:
                raise ConfigError(
                    "data.erasure.languages",
                    d.erasure.languages,
                    f"languages present in {d.erasure.path} ({', '.join(erasure.languages)}); unknown: {unknown}",
                )

        G = d.retrieval.group_size
        if retrieval is not None:
            # Fail before training when a shard is known to hold too small a group (unless skipping).
            short = [s for s in retrieval.shards if s.min_negatives is not None and s.min_negatives < G - 1]
            if short and not d.skip_bad_records:
                s = short[0]
                raise DataError(
                    f"{s.name} (in {retrieval.root})",
                    None,
                    "negatives",
                    f"a group has only {s.min_negatives} negatives; data.retrieval.group_size={G} needs {G - 1} "
                    "(set data.skip_bad_records: true to skip such groups)",
                    reason="too_few_negatives",
                )

        self.languages: list[str] = languages
        self._plan = StreamPlan(
            rank=rank,
            world_size=world_size,
            num_roles=max(1, d.num_workers),
            seed=d.seed,
            shuffle_buffer=d.shuffle_buffer,
            skip_bad=d.skip_bad_records,
            group_size=G,
            queries_per_step=d.retrieval.queries_per_step if retrieval is not None else 0,
            per_language=d.erasure.passages_per_language,
            languages=languages,
            erasure=erasure,
            retrieval=retrieval,
            collator=collator,
        )
        # Everything that defines the sequence of global batches: a state only resumes a stream that agrees.
        self._defines = {
            "fingerprint": {"erasure": _fingerprint(erasure), "retrieval": _fingerprint(retrieval)},
            "data.seed": d.seed,
            "data.shuffle_buffer": d.shuffle_buffer,
            "data.erasure.languages": languages,
            "data.erasure.passages_per_language": d.erasure.passages_per_language if erasure else 0,
            "data.retrieval.queries_per_step": self._plan.queries_per_step,
            "data.retrieval.group_size": G if retrieval is not None else 0,
        }

    @classmethod
    def from_config(
        cls,
        cfg: RunConfig,
        tokenizer: Any,
        *,
        rank: int,
        world_size: int,
        start_step: int = 0,
        num_steps: int | None = None,
    ) -> TrainStream:
        """The stream of run ``cfg`` (``num_steps`` default ``cfg.train.steps``), tokenised by the collator of
        ``cfg.model`` over ``tokenizer``."""
        return cls(
            cfg.data,
            Collator.from_config(cfg.model, tokenizer),
            rank=rank,
            world_size=world_size,
            num_steps=cfg.train.steps if num_steps is None else num_steps,
            start_step=start_step,
        )

    @property
    def next_step(self) -> int:
        return self._next_step

    @property
    def stats(self) -> dict[str, int]:
        """Skipped records / shards of the whole run (all ranks) up to the last step handed out, by reason."""
        return dict(sorted(self._global_state()["stats"].items()))

    def __iter__(self) -> Iterator[TrainBatch]:
        ds = _StepDataset(self._plan, self._next_step, self.end, self._state)
        pin = torch.cuda.is_available()
        source: Any
        if self.num_workers == 0:
            source = iter(ds)
        else:
            # Fork the workers where possible, even when this process was itself spawned (its default method is
            # then "spawn", and every worker would re-import torch and transformers: ~10 s each). The workers
            # only read files and tokenise. Keep the tokenizers library from warning about its threads.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            ctx = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
            source = DataLoader(
                ds,
                batch_size=None,
                num_workers=self.num_workers,
                collate_fn=_identity,
                multiprocessing_context=ctx,
                worker_init_fn=_ignore_preemption_signals,
                # page-locked batches (pinned in the loader's pin thread) so the trainer's copy to the GPU is
                # asynchronous (non_blocking); batches are TrainBatch objects, whose pin_memory() the loader calls
                pin_memory=pin,
            )
        it = iter(source)
        try:
            for batch, st in it:
                if pin and not batch.query_input_ids.is_pinned():
                    batch = batch.pin_memory()
                if batch.step != self._next_step:
                    raise RuntimeError(f"stream produced step {batch.step}, expected {self._next_step}")
                self._state = st
                self._next_step += 1
                yield batch
        finally:
            # Stop the loader workers now, through the DataLoader's own shutdown (a message on their queue), also
            # when a worker raised: the exception's traceback keeps the loader iterator alive, and at interpreter
            # exit multiprocessing would SIGTERM the workers - which ignore SIGTERM (preemption handling) - and
            # join them forever.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def _global_state(self) -> dict[str, Any]:
        if self._state is not None and self._state["next_step"] == self._next_step:
            return self._state
        # nothing handed out yet: the position before step next_step (replayed; no tokenising)
        reader = _GlobalReader(self._plan)
        if self._state is not None:
            reader.restore(self._state)
        reader.skip_to(self._next_step)
        self._state = reader.state()
        return self._state

    def state_dict(self) -> dict[str, Any]:
        st = self._global_state()
        return {
            "format": STATE_FORMAT,
            "next_step": self._next_step,
            "defines": json.loads(json.dumps(self._defines)),
            "streams": st["streams"],
            "stats": st["stats"],
            # informational only: a state resumes on any world size and number of workers
            "written_by": {"world_size": self.world_size, "num_workers": self.num_workers},
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd.get("format") != STATE_FORMAT:
            raise ValueError(
                f"stream state format {sd.get('format')!r}, this version reads {STATE_FORMAT} "
                "(format 1 was per rank, written before global batches)"
            )
        defines = json.loads(json.dumps(self._defines))
        for k, v in defines.items():
            if sd["defines"].get(k) != v:
                raise ValueError(
                    f"stream state field '{k}' is {sd['defines'].get(k)!r}, this stream has {v!r}: "
                    "it changes the global batches, so the run cannot resume with it"
                )
        nxt = int(sd["next_step"])
        if self._start_given not in (0, nxt):
            raise ValueError(
                f"TrainStream(start_step={self._start_given}) but the state resumes at step {nxt}"
            )
        if nxt > self.end:
            raise ValueError(f"stream state is at step {nxt}, past num_steps {self.end}")
        self._next_step = nxt
        self._state = {"next_step": nxt, "streams": sd["streams"], "stats": sd["stats"]}
