"""Parallel and device set-up for the trainer: launch checks, the Accelerate / DeepSpeed accelerator, the device,
and the RNG state that gradient caching replays.

Decisions made here (and nowhere else):
* the device is the accelerator's (``accelerator.device``); :meth:`TrainBatch.to` moves each batch there;
* ``torch.cuda.set_device(LOCAL_RANK)`` runs BEFORE the process group starts (:func:`lancer_dist.dist.set_local_device`),
  with NCCL asynchronous error handling and the ``train.dist_timeout_s`` timeout, so a dead rank fails the job
  instead of hanging it;
* TF32 matmuls are allowed on CUDA (fp32 runs use tensor cores; bf16/fp16 autocast is Accelerate's mixed precision);
* gradient caching under DeepSpeed is allowed for ZeRO stages 0-2 and refused for stage 3 (see
  :func:`check_launch_config`);
* ``train.strategy: fsdp`` is FSDP2 applied by :func:`shard_fsdp` (torch's ``fully_shard`` through
  :mod:`lancer_dist.dist`), NOT through Accelerate's FullyShardedDataParallelPlugin: Accelerate 1.15 turns FSDP on
  only for GPU-like distributed types (``MULTI_GPU``, ``MULTI_XPU``, ...); on CPU it silently ignores the plugin and
  wraps the model in DDP (``MULTI_CPU``), so the sharded path could never be tested on these machines. The Accelerator
  still starts the process group and picks the device; the model and optimizer are not ``prepare``-d.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lancer_dist import dist
from lancer_dist.config import ConfigError, RunConfig

__all__ = [
    "RngState",
    "build_accelerator",
    "check_launch_config",
    "deepspeed_config",
    "effective_zero_stage",
    "fsdp_blocks",
    "shard_fsdp",
]


def effective_zero_stage(cfg: RunConfig) -> int:
    """The ZeRO stage DeepSpeed will run: the user's JSON wins over ``train.zero_stage``."""
    if cfg.train.deepspeed_config and Path(cfg.train.deepspeed_config).is_file():
        ds = json.loads(Path(cfg.train.deepspeed_config).read_text())
        return int(ds.get("zero_optimization", {}).get("stage", 0))
    return cfg.train.zero_stage


def check_launch_config(cfg: RunConfig) -> None:
    """Checks that need the environment (not just the config), done before any process group starts."""
    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("train.precision", "fp16", "fp32 or bf16 on a machine without a GPU")
    if cfg.train.deepspeed_config and not Path(cfg.train.deepspeed_config).is_file():
        raise ConfigError(
            "train.deepspeed_config", cfg.train.deepspeed_config, "an existing DeepSpeed JSON file"
        )
    if (
        cfg.train.grad_cache_chunk_size
        and cfg.train.strategy == "deepspeed"
        and effective_zero_stage(cfg) == 3
    ):
        # ZeRO-3 partitions the parameters themselves and gathers / re-partitions them around every forward and
        # backward through its own hooks; the cached no-grad pass followed by per-chunk re-forwards has not been
        # shown exact there (tests/integration/test_grad_cache.py covers DDP and ZeRO-2). Stages 0-2 keep whole
        # parameters on every rank.
        raise ConfigError(
            "train.grad_cache_chunk_size",
            cfg.train.grad_cache_chunk_size,
            "0 with DeepSpeed ZeRO-3 (gradient caching runs under ddp and DeepSpeed ZeRO stages 0-2: ZeRO-3 "
            "partitions the parameters and re-gathers them in every forward, and the chunk replay is not shown "
            "exact there; use zero_stage 2, or model.gradient_checkpointing under ZeRO-3)",
        )
    # the global batch must divide into equal rank slices (data.retrieval.queries_per_step, erasure m x n)
    from lancer_dist.data.stream import check_world_size

    check_world_size(cfg.data, int(os.environ.get("WORLD_SIZE", "1")))


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
    """The Accelerator for ``cfg``: device bound first, NCCL fail-fast, the process-group timeout, mixed
    precision (bf16 autocast / fp16 with a loss scaler on CUDA), DDP or DeepSpeed."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    dist.set_local_device()  # before Accelerate starts the process group
    cpu = not torch.cuda.is_available()
    if not cpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1 or cfg.train.strategy == "deepspeed"
    fsdp = cfg.train.strategy == "fsdp"
    timeout = datetime.timedelta(seconds=cfg.train.dist_timeout_s)
    # On CPU the process group is gloo; Accelerate + DeepSpeed also need it said explicitly (else they count one
    # process and trip over train_batch_size). On GPU Accelerate picks NCCL.
    handlers = [InitProcessGroupKwargs(backend="gloo" if cpu else "nccl", timeout=timeout)] if multi else []
    mixed = {"fp32": "no", "fp64": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.train.precision]
    if fsdp:
        mixed = "no"  # bf16 is FSDP2's MixedPrecisionPolicy (shard_fsdp), not Accelerate's autocast
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


def fsdp_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules FSDP2 shards one by one (each all-gathered only around its own forward / backward): every module
    whose class a transformers backbone lists in ``_no_split_modules`` (its transformer layers, e.g. BertLayer,
    Qwen2DecoderLayer, and embeddings where listed), innermost first."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    return [m for m in reversed(list(model.modules())) if type(m).__name__ in names]


def shard_fsdp(model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """FSDP2 over every rank: the model moved to ``device``, each block of :func:`fsdp_blocks` and then the root
    sharded; bf16 precision is FSDP2's mixed precision (bf16 compute, float32 master weights and reduction)."""
    model = model.to(device)
    param_dtype = torch.bfloat16 if cfg.train.precision == "bf16" else None
    return dist.fsdp_shard(model, fsdp_blocks(model), device, param_dtype=param_dtype)


class RngState:
    """The RNG state of the CPU and of the accelerator device a forward uses (dropout draws from the device's
    generator: replaying only the CPU state leaves CUDA dropout masks different). Like ``torch.random.fork_rng``,
    but captured once and restored any number of times."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu: Tensor = torch.get_rng_state()
        self.accel: Tensor | None = None
        if device.type != "cpu":
            self.accel = torch.get_device_module(device.type).get_rng_state(device)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.accel is not None:
            torch.get_device_module(self.device.type).set_rng_state(self.accel, self.device)
