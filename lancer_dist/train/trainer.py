"""The LANCER trainer: one explicit ``train()`` -> ``train_step()`` loop (no callback framework).

One multi-task step (paper §3.4, Fig. 2):
    retrieval batch (English groups)  ---\\
                                          >-- one forward of the wrapped bi-encoder --> q, p, x
    erasure batch (balanced languages) --/
    L = L_R(q, p gathered from every rank) + lambda * L_C(x, correlation statistics summed over every rank)

Parallelism is applied from outside the model: Accelerate wraps the bi-encoder in DDP, or in a DeepSpeed ZeRO
engine (stages 0-3), or :func:`lancer_dist.train.parallel.shard_fsdp` applies FSDP2; the global-batch losses get
their collectives from :mod:`lancer_dist.dist`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lancer_dist import dist
from lancer_dist.config import ConfigError, RunConfig, config_to_dict
from lancer_dist.fileio import progress
from lancer_dist.logs import setup_logging
from lancer_dist.losses import LossOutput, lancer_loss
from lancer_dist.train.checkpoint import CheckpointManager, Part, load_zero_resharded
from lancer_dist.train.lock import acquire_for_job
from lancer_dist.train.parallel import (
    RngState,
    build_accelerator,
    check_launch_config,
    deepspeed_config,
    effective_zero_stage,
    shard_fsdp,
)
from lancer_dist.train.run_identity import resume_run_id, run_fingerprint

if TYPE_CHECKING:
    from lancer_dist.data.stream import TrainBatch
    from lancer_dist.model import BiEncoder

log = logging.getLogger("lancer.train")

TRAINER_STATE = "trainer_state.json"
STREAM_STATE = "stream.json"  # the global data-stream position: one file, the same for every rank


# --------------------------------------------------------------------------------------------------------------
# Set-up helpers
# --------------------------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # A parameter partitioned by DeepSpeed ZeRO-3 (zero.Init) is an empty 1-D tensor on every rank: its real
        # shape is ``ds_shape``. Judged by ``p.dim()`` every weight matrix looked like a bias, and ZeRO-3 trained
        # with no weight decay at all.
        ndim = len(getattr(p, "ds_shape", p.shape))
        (no_decay if ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.train.lr)


def lr_lambda(cfg: RunConfig):  # type: ignore[no-untyped-def]
    t = cfg.train

    def f(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        frac = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        frac = min(max(frac, 0.0), 1.0)
        return 1.0 - frac if t.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return f


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_strategy(cfg: RunConfig) -> dict[str, Any]:
    """What a checkpoint records of the strategy that wrote it: ``{"strategy": ..., "zero_stage": N or None}``."""
    stage = effective_zero_stage(cfg) if cfg.train.strategy == "deepspeed" else None
    return {"strategy": cfg.train.strategy, "zero_stage": stage}


def saved_strategy(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """The strategy that wrote checkpoint ``path``: as its trainer state records it, or (a checkpoint from before
    that record) read from its layout: ``fsdp/`` shards (FSDP2), ``pytorch_model/`` (a DeepSpeed engine, stage
    unknown), else Accelerate's full model and optimizer (DDP / one process)."""
    if "strategy" in state:
        return {"strategy": state["strategy"], "zero_stage": state.get("zero_stage")}
    from lancer_dist.train.fsdp_state import FSDP_DIR

    if (path / FSDP_DIR).is_dir():
        return {"strategy": "fsdp", "zero_stage": None}
    if (path / "pytorch_model").is_dir():
        return {"strategy": "deepspeed", "zero_stage": None}
    return {"strategy": "ddp", "zero_stage": None}


def _describe(s: dict[str, Any]) -> str:
    if s["strategy"] == "deepspeed":
        return "DeepSpeed ZeRO-" + (str(s["zero_stage"]) if s["zero_stage"] is not None else "?")
    return {"ddp": "DDP", "fsdp": "FSDP2"}[s["strategy"]]


def check_resume_strategy(path: Path, state: dict[str, Any], cfg: RunConfig, world: int) -> None:
    """Refuse a checkpoint written under another parallel strategy (issue #11): each stores the model and optimizer
    state in its own layout (Accelerate's full state dicts, FSDP2's per-rank shards, DeepSpeed's engine files; ZeRO-3
    partitions the parameters themselves), and none reads another's. The world size may differ (each strategy
    re-assembles or re-partitions its own state; ZeRO-3 refuses that separately). A ConfigError naming
    ``train.strategy``, the checkpoint and both strategies and world sizes."""
    saved, now = saved_strategy(path, state), run_strategy(cfg)
    same = saved["strategy"] == now["strategy"]
    if same and now["strategy"] == "deepspeed" and saved["zero_stage"] is not None:
        same = (saved["zero_stage"] == 3) == (now["zero_stage"] == 3)  # ZeRO-3's files are not ZeRO-0/1/2's
    if not same:
        saved_world = state.get("world_size", "?")
        raise ConfigError(
            "train.strategy",
            cfg.train.strategy if now["strategy"] != "deepspeed" else _describe(now),
            f"the strategy of the checkpoint to resume: {path} was written by {_describe(saved)} on {saved_world} "
            f"rank(s), and this run is {_describe(now)} on {world} rank(s); a checkpoint's model and optimizer "
            "state are in its strategy's own layout and are not converted. Resume with the checkpoint's "
            "strategy, or start a new run (train.checkpoint.resume=never) from the saved final model",
        )


# --------------------------------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------------------------------


PREEMPT_FILE_ENV = "LANCER_PREEMPT_FILE"


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the trainer checks it (agreed over all ranks) at every step boundary.

    Under SLURM no signal is needed: the batch script creates the file named by ``$LANCER_PREEMPT_FILE`` (on the
    shared filesystem) and a thread of every rank, polling it twice a second, sets the same flag. Nothing is sent to
    the job step, so neither the DataLoader workers nor torchrun (which SIGKILLs its workers 30 s after a SIGTERM)
    are involved, however long the step and the checkpoint take."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}
        self._stop_watch = threading.Event()

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            # Ray Train runs the training function in a thread of its worker actor; Python delivers signals to the
            # main thread only (and refuses handlers elsewhere). Ray stops and restarts its workers itself.
            log.info("not the main thread: no SIGTERM/SIGUSR1 checkpoint handler")
            return
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)
        path = os.environ.get(PREEMPT_FILE_ENV)
        if path:
            self._stop_watch.clear()
            threading.Thread(
                target=self._watch, args=(Path(path),), name="lancer-preempt-file", daemon=True
            ).start()

    def _watch(self, path: Path) -> None:
        while not self._stop_watch.wait(0.5):
            if path.exists():
                log.warning("preemption requested (%s exists): checkpointing at the next step boundary", path)
                self.signal = signal.SIGUSR1
                return

    def uninstall(self) -> None:
        self._stop_watch.set()
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def requested(self) -> bool:
        return dist.any_flag(self.signal is not None)


# --------------------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    step: int
    preempted: bool
    output_dir: Path
    final_model: Path | None
    run_id: str | None
    history: list[dict[str, float]] = field(default_factory=list)
    probe_history: list[dict[str, float]] = field(default_factory=list)


def _peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _encode_chunk(model: Any, ids: Tensor, mask: Tensor, is_query: bool) -> Tensor:
    """One chunk of queries or passages through ``model``'s forward (wrapped or not: the same autocast)."""
    if is_query:
        q, _, _ = model(query_input_ids=ids, query_attention_mask=mask)
        return q
    _, p, _ = model(passage_input_ids=ids, passage_attention_mask=mask)
    return p


# Called on every rank with (step, metrics) each time the step metrics are logged; under Ray Train it forwards them
# to ray.train.report (every rank must call that). The trainer knows nothing of the launcher.
LogHook = Callable[[int, dict[str, float]], None]


class Trainer:
    def __init__(self, cfg: RunConfig, on_log: LogHook | None = None):
        check_launch_config(cfg)
        self.cfg = cfg
        self.on_log = on_log
        self.accelerator = build_accelerator(cfg)
        # The one device decision: the accelerator's. Batches are moved there in train_step.
        self.device: torch.device = self.accelerator.device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        setup_logging(self.rank)
        self.out_dir = Path(cfg.output_dir)
        self.ckpt_dir = (
            Path(cfg.train.checkpoint.dir) if cfg.train.checkpoint.dir else self.out_dir / "checkpoints"
        )
        # One job per output directory: every rank knows whether rank 0 got the lock before anything is written.
        self.lock = acquire_for_job(self.out_dir, self.rank)
        try:
            self._build(cfg)
        except BaseException:
            if self.lock is not None:
                self.lock.release()
            raise

    def _build(self, cfg: RunConfig) -> None:
        self.fingerprint = run_fingerprint(self.out_dir) if self.rank == 0 else None
        seed_everything(cfg.train.seed)

        from lancer_dist.data.collate import Collator
        from lancer_dist.data.stream import TrainStream
        from lancer_dist.model import BiEncoder, load_tokenizer

        self.tokenizer = load_tokenizer(cfg.model)
        # The one collator: training batches and the probe's passages are tokenised by it.
        self.collator = Collator.from_config(cfg.model, self.tokenizer)
        model = BiEncoder.from_config(cfg.model)
        # the losses run in float32 (float64 for verification runs) whatever the autocast precision
        self.loss_dtype = torch.float64 if cfg.train.precision == "fp64" else torch.float32
        if cfg.train.precision == "fp64":
            model = model.double()
        self.fsdp = cfg.train.strategy == "fsdp"
        self.model: Any  # the wrapped / sharded bi-encoder (DDP, a DeepSpeed engine, or FSDP2)
        self.optimizer: Any
        if self.fsdp:
            # sharded before the optimizer is built, so that it holds the shards (parallel.py: why not Accelerate)
            self.model = shard_fsdp(model, cfg, self.device)
            self.optimizer = build_optimizer(self.model, cfg)
        else:
            optimizer = build_optimizer(model, cfg)
            self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        if cfg.train.precision == "fp64" and next(self.model.parameters()).dtype != torch.float64:
            # DeepSpeed ZeRO-3 partitions the parameters as float32 whatever their dtype: the run is not fp64.
            log.warning(
                "train.precision=fp64: the prepared model holds %s parameters (DeepSpeed ZeRO-3 casts them); "
                "the step runs in that precision, only the losses in float64",
                next(self.model.parameters()).dtype,
            )
        # Built on the prepared optimizer (ZeRO-3 regroups parameters), stepped by us, and checkpointed in
        # trainer_state.json (plain JSON: nothing is unpickled on resume).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.stream = TrainStream(
            cfg.data, self.collator, rank=self.rank, world_size=self.world, num_steps=cfg.train.steps
        )
        self.num_languages = len(self.stream.languages)
        self.collectives = dist.ProcessGroupCollectives()
        self.step = 0
        self.preemption = Preemption()
        self.history: list[dict[str, float]] = []
        self.probe_history: list[dict[str, float]] = []
        self.probe = self._build_probe()

        from lancer_dist.tracking import Tracker

        self.tracker = Tracker(cfg.tracking, run_dir=self.out_dir, rank=self.rank)
        self.checkpoints = self._checkpoint_manager()

    # ---- the step ------------------------------------------------------------------------------------------

    def _loss(self, q: Tensor, p: Tensor, x: Tensor, b: TrainBatch) -> LossOutput:
        c = self.cfg
        dt = self.loss_dtype
        langs = b.erasure_languages
        mask = c.loss.mask_false_negatives
        return lancer_loss(
            q.to(dt),
            p.to(dt),
            c.data.retrieval.group_size,
            x.to(dt) if x.numel() else None,
            langs if x.numel() else None,
            self.num_languages,
            temperature=c.model.temperature,
            erasure_weight=c.loss.erasure_weight,
            erasure_eps=c.loss.erasure_eps,
            erasure_form=c.loss.erasure_form,
            gather_negatives=c.loss.gather_negatives,
            collectives=self.collectives,
            passage_doc_ids=b.passage_docids if mask else None,
            query_positive_ids=b.query_positive_docids if mask else None,
        )

    def _forward_backward(self, b: TrainBatch) -> LossOutput:
        qe, pe, xe = self.model(
            b.query_input_ids,
            b.query_attention_mask,
            b.passage_input_ids,
            b.passage_attention_mask,
            b.erasure_input_ids,
            b.erasure_attention_mask,
        )
        out = self._loss(qe, pe, xe, b)
        self.accelerator.backward(out.loss)
        return out

    def _forward_backward_cached(self, b: TrainBatch) -> LossOutput:
        """Gradient caching (Gao et al. 2021): embeddings of every chunk without a graph, the loss and its gradient
        w.r.t. the embeddings, then each chunk re-encoded with a graph and back-propagated with the cached
        gradient. Exact: each chunk's CPU and accelerator RNG state is replayed, so its dropout masks match, and
        the first pass runs under the same autocast as the second. Memory is bounded by one chunk's activations
        whatever the size of the negative pool. Gradients are reduced once, with the last chunk: DDP under
        ``no_sync`` before it, DeepSpeed (ZeRO 0-2) with its gradient-accumulation boundary off before it."""
        size = self.cfg.train.grad_cache_chunk_size
        enc = self.unwrapped()  # keeps Accelerate's autocast + fp32-output wrapper
        inputs = [
            (b.query_input_ids, b.query_attention_mask, True),
            (b.passage_input_ids, b.passage_attention_mask, False),
            (b.erasure_input_ids, b.erasure_attention_mask, False),
        ]
        rng: list[list[RngState]] = []
        embs: list[Tensor] = []
        with torch.no_grad():
            for ids, mask, is_q in inputs:
                states, parts = [], []
                for sl in _chunks(ids.shape[0], size):
                    states.append(RngState(self.device))
                    parts.append(_encode_chunk(enc, ids[sl], mask[sl], is_q))
                rng.append(states)
                embs.append(
                    torch.cat(parts)
                    if parts
                    else torch.zeros(0, enc.embedding_dim, dtype=self.loss_dtype, device=self.device)
                )
        leaves = [e.detach().to(self.loss_dtype).requires_grad_(True) for e in embs]
        q_l, p_l, x_l = leaves
        out = self._loss(q_l, p_l, x_l, b)
        out.loss.backward()
        grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
        work = [
            (ids[sl], mask[sl], is_q, g[sl], st)
            for (ids, mask, is_q), g, states in zip(inputs, grads, rng, strict=True)
            for sl, st in zip(_chunks(ids.shape[0], size), states, strict=True)
        ]
        after = RngState(self.device)
        deepspeed = self.cfg.train.strategy == "deepspeed"
        for i, (ids, mask, is_q, g, st) in enumerate(work):
            st.restore()
            last = i == len(work) - 1
            ctx = nullcontext() if last or deepspeed else self.accelerator.no_sync(self.model)
            with ctx:
                emb = _encode_chunk(self.model, ids, mask, is_q)
                # surrogate whose gradient w.r.t. the parameters is J^T g
                surrogate = (emb.to(g.dtype) * g).sum()
                if deepspeed and not last:
                    # Accumulate without the boundary: no reduction, no engine.step (Accelerate's backward
                    # would step the engine after every chunk). The last chunk goes through Accelerate: boundary
                    # on, gradients reduced, engine.step.
                    self.model.set_gradient_accumulation_boundary(False)
                    self.model.backward(surrogate)
                else:
                    self.accelerator.backward(surrogate)
        after.restore()
        return out

    def _forward_backward_erasure_chunks(self, b: TrainBatch) -> LossOutput:
        """``loss.erasure_chunk``: L_C's statistics accumulated over micro-batches of erasure passages (two passes,
        RNG replayed; :mod:`lancer_dist.train.erasure_chunks`), every backward under ``no_sync``; then the retrieval
        forward and backward, the last one, which reduces the accumulated gradients (and touches both towers)."""
        from lancer_dist.train.erasure_chunks import chunked_erasure_backward

        c = self.cfg
        enc = self.unwrapped()
        terms = chunked_erasure_backward(
            lambda ids, mask: _encode_chunk(enc, ids, mask, False),
            lambda ids, mask: _encode_chunk(self.model, ids, mask, False),
            b.erasure_input_ids,
            b.erasure_attention_mask,
            b.erasure_languages,
            self.num_languages,
            c.loss.erasure_chunk,
            erasure_weight=c.loss.erasure_weight,
            form=c.loss.erasure_form,
            eps=c.loss.erasure_eps,
            dtype=self.loss_dtype,
            collectives=self.collectives,
            backward=self.accelerator.backward,
            context=lambda: self.accelerator.no_sync(self.model),
            device=self.device,
        )
        qe, pe, _ = self.model(
            b.query_input_ids, b.query_attention_mask, b.passage_input_ids, b.passage_attention_mask
        )
        empty = torch.zeros(0, 1, dtype=self.loss_dtype, device=self.device)
        out = self._loss(qe, pe, empty, b)
        self.accelerator.backward(out.loss)
        lc = terms.loss.to(out.retrieval.dtype)
        return LossOutput(
            loss=out.loss,
            total=out.retrieval + c.loss.erasure_weight * lc,
            retrieval=out.retrieval,
            erasure=lc,
            num_queries=out.num_queries,
            num_passages=out.num_passages,
            erasure_abs=float(terms.mean_abs),
            erasure_floor=terms.floor,
            negatives_masked=out.negatives_masked,
            passages_without_docid=out.passages_without_docid,
        )

    def train_step(self, b: TrainBatch) -> dict[str, float]:
        """One optimizer step on one multi-task batch; returns the globally reduced metrics."""
        t0 = time.perf_counter()
        b = b.to(self.device, non_blocking=b.query_input_ids.is_pinned())
        self.model.train()
        if self.cfg.train.grad_cache_chunk_size:
            out = self._forward_backward_cached(b)
        elif self.cfg.loss.erasure_chunk:
            out = self._forward_backward_erasure_chunks(b)
        else:
            out = self._forward_backward(b)
        grad_norm = float("nan")
        if self.cfg.train.max_grad_norm > 0 and self.fsdp:
            grad_norm = dist.fsdp_clip_grad_norm(self.model.parameters(), self.cfg.train.max_grad_norm)
        elif self.cfg.train.max_grad_norm > 0 and self.cfg.train.strategy != "deepspeed":
            grad_norm = float(
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.train.max_grad_norm)
            )
        lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.train.strategy == "deepspeed":
            gn = getattr(self.model, "get_global_grad_norm", lambda: None)()
            grad_norm = float(gn) if gn is not None else float("nan")
        # Reading the losses waits for the device, so the step time below covers the queued GPU work too.
        losses = (float(out.total), float(out.retrieval), float(out.erasure))
        tokens = float(
            b.query_attention_mask.sum() + b.passage_attention_mask.sum() + b.erasure_attention_mask.sum()
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        passages = float(b.passage_input_ids.shape[0] + b.erasure_input_ids.shape[0])
        tok_g, pas_g = dist.sum_floats([tokens, passages])
        return {
            "loss/total": losses[0],
            "loss/retrieval": losses[1],
            "loss/erasure": losses[2],
            # the readable L_C: mean |rho| of the global erasure batch against its no-signal expectation
            "loss/erasure_abs": out.erasure_abs,
            "loss/erasure_floor": out.erasure_floor,
            "loss/erasure_over_floor": out.erasure_abs / out.erasure_floor
            if out.erasure_floor > 0
            else float("nan"),
            "lr": lr,
            "grad_norm": grad_norm,
            "passages_per_s": pas_g / dt,
            "tokens_per_s": tok_g / dt,
            "step_time_s": dt,
            "peak_memory_mb": _peak_memory_mb(),
            "negatives_per_query": float(out.num_passages - 1),
            # global (query, passage) pairs removed from the softmax as false negatives, and passages without a
            # docid (never masked); 0 and -1 with loss.mask_false_negatives off
            "negatives_masked": float(out.negatives_masked),
            "passages_without_docid": float(out.passages_without_docid),
        }

    # ---- the probe -----------------------------------------------------------------------------------------

    def _build_probe(self) -> Any:
        from lancer_dist.train.probe import build_probe

        return build_probe(self.cfg, self.stream.languages)

    @torch.no_grad()
    def _encode_texts(self, texts: list[str]) -> Any:
        was_training = self.model.training
        self.model.eval()
        out = []
        for i in range(0, len(texts), 64):
            ids, mask = self.collator.passages(texts[i : i + 64])
            _, p, _ = self.model(
                passage_input_ids=ids.to(self.device), passage_attention_mask=mask.to(self.device)
            )
            out.append(p.float().cpu())
        self.model.train(was_training)
        return torch.cat(out).numpy()

    def run_probe(self) -> dict[str, float] | None:
        if self.probe is None:
            return None
        # Every rank encodes (ZeRO-3 needs every rank in each forward); rank 0 fits and logs.
        result = self.probe.evaluate(self._encode_texts)
        values = {k: float(v) for k, v in result.items() if isinstance(v, int | float)}
        self.probe_history.append({"step": float(self.step), **values})
        metrics = {"probe/" + k.removeprefix("probe_"): v for k, v in values.items()}
        self.tracker.log_metrics(metrics, step=self.step)
        return metrics

    # ---- checkpoints ---------------------------------------------------------------------------------------

    def _ckpt_path(self, step: int) -> Path:
        return self.checkpoints.path(step)

    def _checkpoint_manager(self) -> CheckpointManager:
        """Model, optimizer, RNG (Accelerate / DeepSpeed, sharded under ZeRO-3), the data stream position of every
        rank, and the trainer state (step, scheduler, MLflow run id and the run fingerprint) written by rank 0."""
        return CheckpointManager(
            self.ckpt_dir,
            {
                "accelerator": Part(save=self._save_model_state, load=self._load_model_state),
                "stream": Part(save=self._save_stream, load=self._load_stream),
                "trainer": Part(save=self._save_trainer_state, load=self._load_trainer_state, per_rank=False),
            },
            rank=self.rank,
            world_size=self.world,
            keep_last=self.cfg.train.checkpoint.keep_last,
            marker=TRAINER_STATE,
        )

    def _save_model_state(self, d: Path) -> None:
        # under FSDP nothing is prepare-d: Accelerate saves the RNG states only, the shards are ours
        self.accelerator.save_state(str(d))
        if self.fsdp:
            from lancer_dist.train.fsdp_state import save_fsdp_state

            save_fsdp_state(d, self.model, self.optimizer)

    def _load_model_state(self, d: Path) -> None:
        saved_world = int(json.loads((d / TRAINER_STATE).read_text())["world_size"])
        if self.fsdp:
            from lancer_dist.train.fsdp_state import load_fsdp_state

            self.accelerator.load_state(str(d))  # RNG states
            load_fsdp_state(d, self.model, self.optimizer)
        elif saved_world != self.world and self.cfg.train.strategy == "deepspeed":
            load_zero_resharded(self.model, self.cfg, d, saved_world, rank=self.rank, world=self.world)
        else:
            # DDP / one process: Accelerate saved the full model and optimizer state; any world size loads it
            self.accelerator.load_state(str(d))

    def _save_stream(self, d: Path) -> None:
        stream_state = self.stream.state_dict()
        # every rank read the same global sequence: their positions must agree (else the slices drifted)
        positions = dist.all_gather_object(json.dumps([stream_state["next_step"], stream_state["streams"]]))
        if len(set(positions)) != 1:
            raise RuntimeError(f"ranks disagree on the global data-stream position: {positions}")
        if self.rank == 0:
            (d / STREAM_STATE).write_text(json.dumps(stream_state))

    def _load_stream(self, d: Path) -> None:
        self.stream.load_state_dict(json.loads((d / STREAM_STATE).read_text()))

    def _save_trainer_state(self, d: Path) -> None:
        state = {
            "step": self.step,
            "world_size": self.world,
            **run_strategy(self.cfg),  # refused by another strategy on resume (check_resume_strategy)
            "run_id": self.tracker.run_id,
            "run_fingerprint": self.fingerprint,
            "probe_history": self.probe_history,
            "scheduler": self.scheduler.state_dict(),
        }
        (d / TRAINER_STATE).write_text(json.dumps(state))

    def _load_trainer_state(self, d: Path) -> None:
        state = json.loads((d / TRAINER_STATE).read_text())
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.probe_history = list(state.get("probe_history", []))

    def save_checkpoint(self) -> Path:
        """Written to a temporary directory with a manifest (sha256 of every file) and renamed, so a kill mid-save
        never leaves a checkpoint that looks complete (see :mod:`lancer_dist.train.checkpoint`)."""
        return self.checkpoints.save(self.step)

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint to resume from: verified (every file, sha256), falling back past incomplete ones."""
        return self.checkpoints.find(self.cfg.train.checkpoint.resume)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        state = json.loads((path / TRAINER_STATE).read_text())
        if not (path / STREAM_STATE).is_file():
            raise ConfigError(
                "train.checkpoint.resume",
                str(path),
                f"a checkpoint with a global {STREAM_STATE} (this one predates world-size-invariant streams)",
            )
        check_resume_strategy(path, state, self.cfg, self.world)
        if state["world_size"] != self.world:
            log.info("resuming a %d-rank checkpoint on %d ranks", state["world_size"], self.world)
        self.checkpoints.load(path, verified=True)
        log.info("resumed from %s at step %d", path, self.step)
        return state

    # ---- final model ---------------------------------------------------------------------------------------

    def unwrapped(self) -> BiEncoder:
        """The bi-encoder inside its data-parallel wrapper (Accelerate's autocast wrapper of ``forward`` kept).
        Only a DeepSpeed run asks Accelerate: its ``unwrap_model`` imports DeepSpeed (and DeepSpeed imports MLflow)
        whenever it is installed, ~2.5 s of CPU per rank in a DDP or FSDP2 run that never uses it."""
        if self.cfg.train.strategy == "deepspeed":
            return self.accelerator.unwrap_model(self.model)  # type: ignore[no-any-return]
        m = self.model
        while isinstance(m, torch.nn.parallel.DistributedDataParallel):
            m = m.module
        return m  # type: ignore[no-any-return]

    def full_state_dict(self) -> dict[str, Tensor]:
        """The full parameters, gathered from ZeRO-3 or FSDP2 shards (a collective: every rank calls it); rank 0
        gets the full dict."""
        if self.fsdp:
            return dist.fsdp_full_state_dict(self.model)
        if self.cfg.train.strategy == "deepspeed":  # gathers ZeRO-3 partitions
            return self.accelerator.get_state_dict(self.model)  # type: ignore[no-any-return]
        return self.unwrapped().state_dict()

    def save_final_model(self) -> Path:
        out = self.out_dir / "final_model"
        state = self.full_state_dict()
        if self.rank == 0:
            # No new model is built here: under ZeRO-3 that would be a collective (zero.Init) on rank 0 alone.
            self.unwrapped().save_pretrained(
                out,
                tokenizer=self.tokenizer,
                extra={"run": self.cfg.name},
                state_dict={k: v.detach().cpu() for k, v in state.items()},
            )
        dist.barrier()
        return out

    # ---- the loop ------------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        try:
            return self._train()
        finally:
            if self.lock is not None:  # rank 0: the output directory is free again (also after an error)
                self.lock.release()

    def _train(self) -> TrainResult:
        cfg = self.cfg
        ckpt = self.latest_checkpoint()
        resume_run = None
        if ckpt is not None:
            state = self.load_checkpoint(ckpt)
            # this directory's own checkpoint continues its MLflow run; a copied one starts a new run
            resume_run = resume_run_id(state, self.fingerprint, ckpt) if self.rank == 0 else None
        self.tracker.start(
            config_to_dict(cfg), run_name=cfg.tracking.run_name or cfg.name, resume_run_id=resume_run
        )
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._log_config_artifacts()
        self.preemption.install()
        preempted = False
        try:
            if self.step == 0:
                self.run_probe()
            bar = progress("train", "step", cfg.train.steps, self.step, enabled=self.rank == 0)
            for batch in self.stream:
                metrics = self.train_step(batch)
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss/total']:.4f}", lc=f"{metrics['loss/erasure']:.4f}")
                metrics["step"] = float(self.step)
                self.history.append(metrics)
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    self.tracker.log_metrics(
                        {k: v for k, v in metrics.items() if k != "step"}, step=self.step
                    )
                    log.info("step %d %s", self.step, _fmt(metrics))
                    if self.on_log is not None:
                        self.on_log(self.step, metrics)
                if self.step % cfg.probe.every == 0 or self.step == cfg.train.steps:
                    self.run_probe()
                every = cfg.train.checkpoint.every
                if self.preemption.requested():
                    preempted = True
                    self.save_checkpoint()
                    break
                if every and self.step % every == 0 and self.step < cfg.train.steps:
                    self.save_checkpoint()
            bar.close()
            final_model = None
            if not preempted:
                self.save_checkpoint()
                final_model = self.save_final_model()
                self._log_final_artifacts(final_model)
        except BaseException:
            self.tracker.finish("FAILED")
            raise
        finally:
            self.preemption.uninstall()
        self.tracker.finish("KILLED" if preempted else "FINISHED")
        return TrainResult(
            step=self.step,
            preempted=preempted,
            output_dir=self.out_dir,
            final_model=final_model,
            run_id=self.tracker.run_id,
            history=self.history,
            probe_history=self.probe_history,
        )

    def _log_config_artifacts(self) -> None:
        import yaml

        from lancer_dist.redact import redact_mapping

        resolved = self.out_dir / "config.yaml"
        resolved.write_text(yaml.safe_dump(redact_mapping(config_to_dict(self.cfg)), sort_keys=False))
        self.tracker.log_artifact(resolved)
        if self.cfg.train.strategy == "deepspeed":
            ds = self.out_dir / "deepspeed_config.json"
            ds.write_text(json.dumps(deepspeed_config(self.cfg, self.world), indent=2))
            self.tracker.log_artifact(ds)
        self.tracker.set_tags({"lancer.world_size": self.world, "lancer.strategy": self.cfg.train.strategy})

    def _log_final_artifacts(self, final_model: Path) -> None:
        if self.rank != 0:
            return
        if self.probe_history:
            from lancer_dist.train.probe import probe_curve_png

            png = self.out_dir / "probe_curve.png"
            probe_curve_png(self.probe_history, png)
            self.tracker.log_artifact(png)
            (self.out_dir / "probe_history.json").write_text(json.dumps(self.probe_history, indent=2))
        (self.out_dir / "history.json").write_text(json.dumps(self.history, indent=2))
        self.tracker.log_model_dir(final_model)


def _fmt(m: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in m.items() if k != "step")


def train(cfg: RunConfig, on_log: LogHook | None = None) -> TrainResult:
    """Run (or resume) a training job described by ``cfg`` in this process (one rank of a torchrun job, or one
    Ray Train worker: the process group then exists already, and Accelerate joins it)."""
    return Trainer(cfg, on_log=on_log).train()
