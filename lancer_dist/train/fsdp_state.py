"""Sharded FSDP2 checkpoints (``train.strategy: fsdp``): every rank writes its own shard of the model and the
optimizer state as safetensors, plus a JSON file; nothing is pickled.

Layout inside a checkpoint directory::

    fsdp/rank00000.safetensors   this rank's local pieces: ``model/<fqn>``, ``optim/<fqn>/<state>``
    fsdp/rank00000.json          for each tensor: sharded along dim 0 or whole, its global shape; the optimizer's
                                 non-tensor state and its param groups

Why not ``torch.distributed.checkpoint`` (DCP)? Its file-system reader loads the ``.metadata`` file with a plain
``pickle.load`` and non-tensor items with a full unpickler: a crafted checkpoint would run code, which this project
forbids (lancer_dist/train/checkpoint.py). Safetensors and JSON carry no code.

Loading reassembles each full tensor from the pieces of every saved rank (FSDP2 shards dim 0 in ``torch.chunk``
order, so the pieces concatenate in rank order) and hands the full state to torch's ``set_state_dict``, which keeps
each rank's own shard. So a checkpoint resumes on any number of ranks; the price is that every rank holds the full
state for a moment while loading (a 7B model's fp32 weights and Adam moments: ~84 GB of host memory per rank).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lancer_dist import dist

__all__ = ["FSDP_DIR", "load_fsdp_state", "save_fsdp_state"]

FSDP_DIR = "fsdp"


def save_fsdp_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shard (no collective: each rank's pieces are local)."""
    rank = dist.get_rank()
    tensors, meta = dist.fsdp_local_state(model, optimizer)
    meta["world_size"] = dist.get_world_size()
    out = directory / FSDP_DIR
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / f"rank{rank:05d}.safetensors"))
    (out / f"rank{rank:05d}.json").write_text(json.dumps(meta))


def load_fsdp_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Reassemble the full state from every saved rank's shard and load it (any world size)."""
    root = directory / FSDP_DIR
    meta0 = json.loads((root / "rank00000.json").read_text())
    saved_world = int(meta0["world_size"])
    files = [root / f"rank{r:05d}.safetensors" for r in range(saved_world)]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"FSDP checkpoint {directory} lacks the shards {missing}")
    readers = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    full: dict[str, torch.Tensor] = {}
    for name, info in meta0["tensors"].items():
        if info["sharded"]:
            t = torch.cat([r.get_tensor(name) for r in readers], dim=0)
        else:
            t = readers[0].get_tensor(name)
        if list(t.shape) != info["shape"]:
            raise ValueError(
                f"FSDP checkpoint {directory}: {name} reassembles to {list(t.shape)}, the shard files say "
                f"{info['shape']}"
            )
        full[name] = t
    model_sd = {k.removeprefix("model/"): v for k, v in full.items() if k.startswith("model/")}
    state: dict[str, dict[str, Any]] = {}
    for k, v in full.items():
        if k.startswith("optim/"):
            fqn, _, name = k.removeprefix("optim/").rpartition("/")
            state.setdefault(fqn, {})[name] = v
    for fqn, other in meta0["optim_other"].items():
        state.setdefault(fqn, {}).update(other)
    dist.fsdp_load_full_state(
        model, optimizer, model_sd, {"state": state, "param_groups": meta0["param_groups"]}
    )
