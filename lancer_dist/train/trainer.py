"""The LANCER trainer: one explicit ``train()`` -> ``train_step()`` loop (no callback framework).

One multi-task step (paper §3.4, Fig. 2):
    retrieval batch (English groups)  ---\\
                                          >-- one forward of the wrapped bi-encoder --> q, p, x
    erasure batch (balanced languages) --/
    L = L_R(q, p gathered from every rank) + lambda * L_C(x, correlation statistics summed over every rank)

Parallelism is applied from outside the model: Accelerate wraps the bi-encoder in DDP, or in a DeepSpeed ZeRO
engine (stages 0-3); the global-batch losses get their collectives from :mod:`lancer_dist.dist`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lancer_dist import dist
from lancer_dist.config import ConfigError, RunConfig, config_to_dict
from lancer_dist.losses import LossOutput, lancer_loss

log = logging.getLogger("lancer.train")

CKPT_PREFIX = "step-"
TRAINER_STATE = "trainer_state.json"


# --------------------------------------------------------------------------------------------------------------
# Set-up helpers
# --------------------------------------------------------------------------------------------------------------


def check_launch_config(cfg: RunConfig) -> None:
    """Checks that need the environment (not just the config), done before any process group starts."""
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision", "fp16", "fp32 or bf16 on a machine without a GPU")
    if cfg.train.grad_cache_chunk_size and cfg.train.strategy == "deepspeed":
        raise ConfigError(
            "train.grad_cache_chunk_size",
            cfg.train.grad_cache_chunk_size,
            "0 with train.strategy=deepspeed (gradient caching is implemented for ddp / one process)",
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.data.retrieval.queries_per_step % world:
        raise ConfigError(
            "data.retrieval.queries_per_step",
            cfg.data.retrieval.queries_per_step,
            f"a multiple of the world size {world}",
        )
    if cfg.train.deepspeed_config and not Path(cfg.train.deepspeed_config).is_file():
        raise ConfigError(
            "train.deepspeed_config", cfg.train.deepspeed_config, "an existing DeepSpeed JSON file"
        )


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config: the user's JSON (cluster/deepspeed/) or one for ``train.zero_stage``, with the batch
    sizes, clipping and precision filled in from the run config (so they can never disagree)."""
    if cfg.train.deepspeed_config:
        ds: dict[str, Any] = json.loads(Path(cfg.train.deepspeed_config).read_text())
    else:
        ds = {"zero_optimization": {"stage": cfg.train.zero_stage}}
    micro = cfg.data.retrieval.queries_per_step // world_size
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = micro * world_size
    ds["gradient_clipping"] = cfg.train.max_grad_norm
    ds["zero_allow_untested_optimizer"] = True  # our torch AdamW: no fused-Adam JIT build on CPU
    ds["bf16"] = {"enabled": cfg.train.precision == "bf16"}
    ds["fp16"] = {"enabled": cfg.train.precision == "fp16"}
    zero = ds.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:
        # the final model is gathered from the shards (in the training dtype, despite the option's name)
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def build_accelerator(cfg: RunConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    cpu = not torch.cuda.is_available()
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.train.strategy == "deepspeed"
    # On CPU the process group is gloo; Accelerate + DeepSpeed also need it said explicitly (else they count one
    # process and trip over train_batch_size).
    handlers = [InitProcessGroupKwargs(backend="gloo")] if cpu and multi else []
    mixed = {"fp32": "no", "fp64": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.train.precision]
    plugin = None
    if cfg.train.strategy == "deepspeed":
        os.environ.setdefault("ACCELERATE_USE_DEEPSPEED", "true")
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, int(os.environ.get("WORLD_SIZE", "1"))))
    # cpu=True would make Accelerate ignore DeepSpeed; without a GPU it runs on the CPU anyway.
    force_cpu = cpu and cfg.train.strategy != "deepspeed"
    acc = Accelerator(cpu=force_cpu, mixed_precision=mixed, deepspeed_plugin=plugin, kwargs_handlers=handlers)
    if cfg.train.strategy == "deepspeed" and str(acc.distributed_type) != "DistributedType.DEEPSPEED":
        raise RuntimeError(f"DeepSpeed was requested but Accelerate set up {acc.distributed_type}")
    return acc


def build_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
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


# --------------------------------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------------------------------


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the trainer checks it (agreed over all ranks) at every step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            # Ray Train runs the training function in a thread of its worker actor; Python delivers signals to the
            # main thread only (and refuses handlers elsewhere). Ray stops and restarts its workers itself.
            log.info("not the main thread: no SIGTERM/SIGUSR1 checkpoint handler")
            return
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def requested(self) -> bool:
        flag = torch.tensor([1.0 if self.signal is not None else 0.0])
        return bool(dist.all_reduce_sum(flag).item() > 0)


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


# Called on every rank with (step, metrics) each time the step metrics are logged; under Ray Train it forwards them
# to ray.train.report (every rank must call that). The trainer knows nothing of the launcher.
LogHook = Callable[[int, dict[str, float]], None]


class Trainer:
    def __init__(self, cfg: RunConfig, on_log: LogHook | None = None):
        check_launch_config(cfg)
        self.cfg = cfg
        self.on_log = on_log
        self.accelerator = build_accelerator(cfg)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        _setup_logging(self.rank)
        self.out_dir = Path(cfg.output_dir)
        self.ckpt_dir = (
            Path(cfg.train.checkpoint.dir) if cfg.train.checkpoint.dir else self.out_dir / "checkpoints"
        )
        seed_everything(cfg.train.seed)

        from lancer_dist.data.stream import TrainStream
        from lancer_dist.model import BiEncoder, load_tokenizer

        self.tokenizer = load_tokenizer(cfg.model)
        model = BiEncoder.from_config(cfg.model)
        # the losses run in float32 (float64 for verification runs) whatever the autocast precision
        self.loss_dtype = torch.float64 if cfg.train.precision == "fp64" else torch.float32
        if cfg.train.precision == "fp64":
            model = model.double()
        optimizer = build_optimizer(model, cfg)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        # Built on the prepared optimizer (ZeRO-3 regroups parameters), stepped by us, and checkpointed in
        # trainer_state.json (plain JSON: nothing is unpickled on resume).
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.stream = TrainStream(cfg, self.tokenizer, rank=self.rank, world_size=self.world)
        self.num_languages = len(self.stream.languages)
        self.collectives = dist.ProcessGroupCollectives()
        self.step = 0
        self.preemption = Preemption()
        self.history: list[dict[str, float]] = []
        self.probe_history: list[dict[str, float]] = []
        self.probe = self._build_probe()

        from lancer_dist.train.tracking import Tracker

        self.tracker = Tracker(cfg.tracking, run_dir=self.out_dir, rank=self.rank)

    # ---- the step ------------------------------------------------------------------------------------------

    def _loss(self, q: Tensor, p: Tensor, x: Tensor, langs: Tensor) -> LossOutput:
        c = self.cfg
        dt = self.loss_dtype
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
            gather_negatives=c.loss.gather_negatives,
            collectives=self.collectives,
        )

    def _forward_backward(self, b: Any) -> LossOutput:
        qe, pe, xe = self.model(
            b.query_input_ids,
            b.query_attention_mask,
            b.passage_input_ids,
            b.passage_attention_mask,
            b.erasure_input_ids,
            b.erasure_attention_mask,
        )
        out = self._loss(qe, pe, xe, b.erasure_languages)
        self.accelerator.backward(out.loss)
        return out

    def _forward_backward_cached(self, b: Any) -> LossOutput:
        """Gradient caching (Gao et al. 2021): embeddings of every chunk without a graph, the loss and its gradient
        w.r.t. the embeddings, then each chunk re-encoded with a graph and back-propagated with the cached
        gradient. Exact (the RNG state of each chunk is replayed, so dropout masks match); memory is bounded by one
        chunk's activations whatever the size of the negative pool."""
        size = self.cfg.train.grad_cache_chunk_size
        enc = self.accelerator.unwrap_model(self.model)
        inputs = [
            (b.query_input_ids, b.query_attention_mask, True),
            (b.passage_input_ids, b.passage_attention_mask, False),
            (b.erasure_input_ids, b.erasure_attention_mask, False),
        ]
        rng: list[list[Any]] = []
        embs: list[Tensor] = []
        with torch.no_grad():
            for ids, mask, is_q in inputs:
                states, parts = [], []
                for sl in _chunks(ids.shape[0], size):
                    states.append(torch.get_rng_state())
                    parts.append(enc.encode(ids[sl], mask[sl], is_query=is_q))
                rng.append(states)
                embs.append(
                    torch.cat(parts) if parts else torch.zeros(0, enc.embedding_dim, dtype=self.loss_dtype)
                )
        leaves = [e.detach().requires_grad_(True) for e in embs]
        q_l, p_l, x_l = leaves
        out = self._loss(q_l, p_l, x_l, b.erasure_languages)
        out.loss.backward()
        grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
        work = [
            (ids[sl], mask[sl], is_q, g[sl], st)
            for (ids, mask, is_q), g, states in zip(inputs, grads, rng, strict=True)
            for sl, st in zip(_chunks(ids.shape[0], size), states, strict=True)
        ]
        after = torch.get_rng_state()
        for i, (ids, mask, is_q, g, st) in enumerate(work):
            torch.set_rng_state(st)
            last = i == len(work) - 1
            ctx = nullcontext() if last else self.accelerator.no_sync(self.model)
            with ctx:
                kw = (
                    {"query_input_ids": ids, "query_attention_mask": mask}
                    if is_q
                    else {"passage_input_ids": ids, "passage_attention_mask": mask}
                )
                q, p, _ = self.model(**kw)
                emb = q if is_q else p
                # surrogate whose gradient w.r.t. the parameters is J^T g
                self.accelerator.backward((emb.to(g.dtype) * g).sum())
        torch.set_rng_state(after)
        return out

    def train_step(self, b: Any) -> dict[str, float]:
        """One optimizer step on one multi-task batch; returns the globally reduced metrics."""
        t0 = time.perf_counter()
        self.model.train()
        if self.cfg.train.grad_cache_chunk_size:
            out = self._forward_backward_cached(b)
        else:
            out = self._forward_backward(b)
        grad_norm = float("nan")
        if self.cfg.train.max_grad_norm > 0 and self.cfg.train.strategy != "deepspeed":
            grad_norm = float(
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.train.max_grad_norm)
            )
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.train.strategy == "deepspeed":
            gn = getattr(self.model, "get_global_grad_norm", lambda: None)()
            grad_norm = float(gn) if gn is not None else float("nan")
        dt = time.perf_counter() - t0
        tokens = float(
            b.query_attention_mask.sum() + b.passage_attention_mask.sum() + b.erasure_attention_mask.sum()
        )
        passages = float(b.passage_input_ids.shape[0] + b.erasure_input_ids.shape[0])
        tok_g, pas_g = dist.all_reduce_sum(torch.tensor([tokens, passages], dtype=torch.float64)).tolist()
        return {
            "loss/total": float(out.total),
            "loss/retrieval": float(out.retrieval),
            "loss/erasure": float(out.erasure),
            "lr": lr,
            "grad_norm": grad_norm,
            "passages_per_s": pas_g / dt,
            "tokens_per_s": tok_g / dt,
            "step_time_s": dt,
            "peak_memory_mb": _peak_memory_mb(),
            "negatives_per_query": float(out.num_passages - 1),
        }

    # ---- the probe -----------------------------------------------------------------------------------------

    def _build_probe(self) -> Any:
        pc = self.cfg.probe
        if not pc.enabled:
            return None
        from lancer_dist.data.shards import iter_shard, read_manifest
        from lancer_dist.train.probe import LanguageProbe

        path = pc.path or self.cfg.data.erasure.path
        if not path:
            return None
        manifest = read_manifest(path)
        langs = self.stream.languages or manifest.languages
        pairs = []
        for shard in manifest.shards:
            for _key, rec in iter_shard(manifest.shard_path(shard)):
                if rec.get("lang") in langs and isinstance(rec.get("text"), str):
                    pairs.append((rec["text"], rec["lang"]))
        return LanguageProbe.from_pool(
            pairs, pc.train_per_language, pc.test_per_language, languages=langs, seed=self.cfg.train.seed
        )

    @torch.no_grad()
    def _encode_texts(self, texts: list[str]) -> Any:
        from lancer_dist.data.collate import Collator

        collator = Collator.from_config(self.cfg.model, self.tokenizer)
        was_training = self.model.training
        self.model.eval()
        out = []
        for i in range(0, len(texts), 64):
            ids, mask = collator.passages(texts[i : i + 64])
            _, p, _ = self.model(passage_input_ids=ids, passage_attention_mask=mask)
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
        return self.ckpt_dir / f"{CKPT_PREFIX}{step:08d}"

    def save_checkpoint(self) -> Path:
        """Model, optimizer, scheduler, RNG (Accelerate / DeepSpeed, sharded under ZeRO-3), the data stream
        position of every rank, the step and the MLflow run id. Written to a temporary directory and renamed, so
        a kill mid-save never leaves a checkpoint that looks complete."""
        final = self._ckpt_path(self.step)
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        self.accelerator.save_state(str(tmp))
        (tmp / f"stream-rank{self.rank:05d}.json").write_text(json.dumps(self.stream.state_dict()))
        dist.barrier()
        if self.rank == 0:
            state = {
                "step": self.step,
                "world_size": self.world,
                "run_id": self.tracker.run_id,
                "probe_history": self.probe_history,
                "scheduler": self.scheduler.state_dict(),
            }
            (tmp / TRAINER_STATE).write_text(json.dumps(state))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            self._prune_checkpoints()
        dist.barrier()
        log.info("checkpoint saved: %s", final)
        return final

    def _prune_checkpoints(self) -> None:
        done = sorted(p for p in self.ckpt_dir.glob(f"{CKPT_PREFIX}*") if (p / TRAINER_STATE).is_file())
        for old in done[: -self.cfg.train.checkpoint.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        resume = self.cfg.train.checkpoint.resume
        if resume == "never":
            return None
        if resume != "auto":
            p = Path(resume)
            if not (p / TRAINER_STATE).is_file():
                raise ConfigError(
                    "train.checkpoint.resume", resume, "'auto', 'never' or a complete checkpoint"
                )
            return p
        done = sorted(p for p in self.ckpt_dir.glob(f"{CKPT_PREFIX}*") if (p / TRAINER_STATE).is_file())
        return done[-1] if done else None

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        state = json.loads((path / TRAINER_STATE).read_text())
        if state["world_size"] != self.world:
            raise ConfigError(
                "train.checkpoint.resume",
                str(path),
                f"a checkpoint written with the same world size (it has {state['world_size']}, now {self.world})",
            )
        self.accelerator.load_state(str(path))
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(json.loads((path / f"stream-rank{self.rank:05d}.json").read_text()))
        self.step = int(state["step"])
        self.probe_history = list(state.get("probe_history", []))
        log.info("resumed from %s at step %d", path, self.step)
        return state

    # ---- final model ---------------------------------------------------------------------------------------

    def save_final_model(self) -> Path:
        out = self.out_dir / "final_model"
        state = self.accelerator.get_state_dict(
            self.model
        )  # gathers ZeRO-3 shards; rank 0 gets the full dict
        if self.rank == 0:
            # No new model is built here: under ZeRO-3 that would be a collective (zero.Init) on rank 0 alone.
            self.accelerator.unwrap_model(self.model).save_pretrained(
                out,
                tokenizer=self.tokenizer,
                extra={"run": self.cfg.name},
                state_dict={k: v.detach().cpu() for k, v in state.items()},
            )
        dist.barrier()
        return out

    # ---- the loop ------------------------------------------------------------------------------------------

    def train(self) -> TrainResult:
        cfg = self.cfg
        ckpt = self.latest_checkpoint()
        resume_run = None
        if ckpt is not None:
            # None when the tracking store was down at the start: the tracker then finds the run by its spool
            resume_run = self.load_checkpoint(ckpt).get("run_id") or "auto"
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
            bar = _progress(self.rank == 0, cfg.train.steps, self.step)
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


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _progress(enabled: bool, total: int, initial: int) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)


def _setup_logging(rank: int) -> None:
    fmt = f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    if not any(getattr(h, "_lancer", False) for h in root.handlers):
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter(fmt))
        h._lancer = True  # type: ignore[attr-defined]
        root.addHandler(h)
        root.setLevel(logging.INFO)


def train(cfg: RunConfig, on_log: LogHook | None = None) -> TrainResult:
    """Run (or resume) a training job described by ``cfg`` in this process (one rank of a torchrun job, or one
    Ray Train worker: the process group then exists already, and Accelerate joins it)."""
    return Trainer(cfg, on_log=on_log).train()
