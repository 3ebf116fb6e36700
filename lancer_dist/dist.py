"""The one module that owns every collective.

Everything here is a no-op (identity, rank 0 of 1) when ``torch.distributed`` is not initialised, so single-process
code paths are the same code as multi-process ones.

Gradient semantics (the central correctness claim)
--------------------------------------------------
Data-parallel training averages parameter gradients over the N ranks (DDP and DeepSpeed both do). A loss computed on
*global* quantities (passages gathered from every rank, correlation statistics summed over every rank) must therefore
be written so that each rank's backward yields N x its share of the full-batch gradient:

* :func:`gather_with_grad` sends the gradient of every gathered slice back to the rank that owns it, summed over
  all ranks (each rank's loss uses every rank's passages).
* :func:`all_reduce_with_grad` all-reduces (sums) the gradient of the reduced statistics as well, so a loss that is
  identical on every rank (the erasure loss on global statistics) gets gradient N x dL/dstats on each rank.

With the retrieval loss on rank r written as ``N * sum_{i in r} l_i / B_global`` (see
:func:`lancer_dist.losses.lancer_loss`), averaging over ranks reproduces one process on the concatenated batch
exactly; ``tests/distributed`` proves it to 1e-10 in float64.

FSDP2 (``train.strategy: fsdp``)
-------------------------------
The ``fsdp_*`` helpers below apply PyTorch's ``fully_shard`` (FSDP2) from outside the model and read / write its
sharded state. FSDP2 reduce-scatters gradients as an *average* over the ranks, like DDP, so the losses above need no
change. Each helper is the plain single-process operation when no process group exists.

Devices
-------
A collective only accepts tensors on a device its process group has a backend for: NCCL has none for CPU tensors
("No backend type associated with device type cpu"). :func:`collective_device` reads the group's backends and
returns the device every tensor that this module creates for a collective lives on (the CPU when the group has a CPU
backend, else the current accelerator device, e.g. ``torch.cuda.current_device()`` under NCCL). Callers hand Python
numbers (:func:`sum_floats`, :func:`any_flag`, :func:`mean_over_ranks`) or tensors on any device
(:func:`all_reduce_sum`); nothing outside this module creates a tensor for a collective.
"""

from __future__ import annotations

import datetime
import os
import socket
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ProcessGroupCollectives",
    "all_gather_object",
    "all_gather_strings",
    "all_reduce_sum",
    "all_reduce_with_grad",
    "any_flag",
    "barrier",
    "broadcast_object",
    "collective_device",
    "device_for_backends",
    "find_free_port",
    "fsdp_clip_grad_norm",
    "fsdp_full_state_dict",
    "fsdp_load_full_state",
    "fsdp_local_state",
    "fsdp_shard",
    "gather_with_grad",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_process_group",
    "is_initialized",
    "is_main_process",
    "mean_over_ranks",
    "set_local_device",
    "sum_floats",
]


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def shutdown(barrier: bool = True) -> None:
    """Destroy the default process group, if one exists: a process that exits with its group alive leaves the
    backend's threads (NCCL's watchdog, gloo's workers, the store's) to be torn down during interpreter exit, which
    PyTorch warns about and which aborts the exit now and then ("terminate called without an active exception",
    SIGABRT: measured on 4 of 16 refused 2-rank gloo jobs before the error paths shut down too).

    ``barrier``: wait for every rank first (the end of a run, or an error every rank raised together, like a
    refused output directory); False on an error that may be one rank's own, where a barrier would wait for ranks
    that never come. For a process that owns its group (``lancer train`` under torchrun or alone); a Ray Train
    worker's group belongs to Ray Train."""
    if is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def find_free_port(host: str = "127.0.0.1") -> int:
    """An ephemeral TCP port free at the time of the call (for rendezvous in tests and cluster front-ends)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def set_local_device() -> torch.device:
    """Bind this process to its accelerator (``LOCAL_RANK``) BEFORE the process group starts, and make NCCL fail
    fast instead of hanging: NCCL creates its communicators on the current device (all ranks on GPU 0 otherwise),
    and with asynchronous error handling a collective that times out aborts the process instead of blocking
    forever. Returns the device (the CPU on a machine without CUDA)."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    local = get_local_rank()
    if local >= torch.cuda.device_count():
        raise RuntimeError(f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} CUDA devices")
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def init_process_group(
    backend: str | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    timeout_s: float = 600.0,
) -> None:
    """Initialise the default process group (gloo on CPU, nccl on GPU) unless already initialised.

    Without arguments it reads the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). The local
    device is set first (:func:`set_local_device`); ``timeout_s`` bounds every collective.
    """
    if is_initialized():
        return
    set_local_device()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs: dict = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
    if init_method is not None:
        kwargs["init_method"] = init_method
    if rank is not None:
        kwargs["rank"] = rank
    if world_size is not None:
        kwargs["world_size"] = world_size
    dist.init_process_group(**kwargs)


def device_for_backends(backend_config: str, current: torch.device | None = None) -> torch.device:
    """The device for collective tensors of a group whose backends are ``backend_config`` (torch's
    ``get_backend_config()`` string, e.g. ``"cpu:gloo,cuda:nccl"``, ``"cuda:nccl"``, ``"cuda:gloo"``): the CPU when
    a CPU backend exists, else ``current`` (default: the current device of the group's accelerator type)."""
    types = [part.split(":", 1)[0].strip() for part in backend_config.split(",") if ":" in part]
    if not types or "cpu" in types:
        return torch.device("cpu")
    if current is not None:
        return current
    kind = types[0]
    return torch.device(kind, torch.get_device_module(kind).current_device())


def collective_device() -> torch.device:
    """The device of every tensor this module creates for a collective (see the module docstring)."""
    if not is_initialized():
        return torch.device("cpu")
    return device_for_backends(str(dist.get_backend_config()))


def _all_sizes(n: int) -> list[int]:
    t = torch.tensor([n], dtype=torch.long, device=collective_device())
    out = [torch.zeros_like(t) for _ in range(get_world_size())]
    dist.all_gather(out, t)
    return [int(o.item()) for o in out]


class _AllGatherCat(torch.autograd.Function):
    """Gather equal-shaped tensors from every rank and concatenate them along dim 0.

    Backward: every rank's loss used every rank's rows, so the gradient of this rank's rows is the SUM over ranks of
    the gradient arriving at them: all-reduce the full gradient, keep our slice.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.rank, ctx.n = get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; the gradient (identical loss on every rank, or not) is summed over ranks as well."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        y = x.contiguous().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """Concatenate ``x`` [n_r, ...] from every rank along dim 0, keeping the autograd graph.

    Returns ``(gathered, offset)`` where ``offset`` is where this rank's rows start in ``gathered``. Ranks may hold
    different numbers of rows (padded to the largest, then trimmed). The backward pass sums the gradient of each
    slice over all ranks and returns it to its owner. Without a process group: ``(x, 0)``.
    """
    if not is_initialized() or get_world_size() == 1:
        return x, 0
    sizes = _all_sizes(x.shape[0])
    offset = sum(sizes[: get_rank()])
    max_n = max(sizes)
    if all(s == max_n for s in sizes):
        return _AllGatherCat.apply(x), offset
    pad = [0, 0] * (x.dim() - 1) + [0, max_n - x.shape[0]]
    gathered = _AllGatherCat.apply(F.pad(x, pad))
    keep = [gathered[r * max_n : r * max_n + s] for r, s in enumerate(sizes)]
    return torch.cat(keep, dim=0), offset


def all_reduce_with_grad(x: Tensor) -> Tensor:
    """Sum ``x`` over all ranks; the gradient is summed over ranks too. Identity without a process group."""
    if not is_initialized() or get_world_size() == 1:
        return x
    return _AllReduceSum.apply(x)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum a tensor over all ranks without autograd (counts, metrics). Returns a new tensor on ``x``'s device
    (reduced on :func:`collective_device`)."""
    if not is_initialized() or get_world_size() == 1:
        return x.detach().clone()
    y = x.detach().to(collective_device(), copy=True)
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y.to(x.device)


def sum_floats(values: Sequence[float]) -> list[float]:
    """Sum a few Python numbers over ranks (float64, on the collective device)."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=collective_device())
    if is_initialized() and get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return [float(v) for v in t.tolist()]


def any_flag(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (e.g. a preemption signal seen by one rank)."""
    return sum_floats([1.0 if flag else 0.0])[0] > 0


def all_gather_object(obj: object) -> list[object]:
    if not is_initialized() or get_world_size() == 1:
        return [obj]
    out: list[object] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_gather_strings(xs: Sequence[str]) -> list[str]:
    """Concatenate each rank's list of strings in rank order (document ids travelling with the passages that
    :func:`gather_with_grad` gathers, in the same order). Exact: the strings themselves, not hashes."""
    if not is_initialized() or get_world_size() == 1:
        return list(xs)
    parts = all_gather_object(list(xs))
    return [str(s) for part in parts for s in part]  # type: ignore[attr-defined]


def broadcast_object(obj: object, src: int = 0) -> object:
    if not is_initialized() or get_world_size() == 1:
        return obj
    box: list[object] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class ProcessGroupCollectives:
    """The :class:`lancer_dist.losses.Collectives` implementation over the default process group.

    Pass an instance to :func:`lancer_dist.losses.lancer_loss` (or the ``collectives=`` argument of the individual
    losses) to compute them over the global batch. Every method is the identity without a process group.
    """

    @property
    def world_size(self) -> int:
        return get_world_size()

    def gather(self, x: Tensor) -> tuple[Tensor, int]:
        return gather_with_grad(x)

    def sum_with_grad(self, x: Tensor) -> Tensor:
        return all_reduce_with_grad(x)

    def sum_no_grad(self, x: Tensor) -> Tensor:
        return all_reduce_sum(x)

    def gather_strings(self, xs: Sequence[str]) -> list[str]:
        return all_gather_strings(xs)


def mean_over_ranks(values: Sequence[float]) -> list[float]:
    """Average a few Python floats over ranks (for logging reduced metrics)."""
    return [v / get_world_size() for v in sum_floats(values)]


# ---- FSDP2 ------------------------------------------------------------------------------------------------------


def _is_dtensor(x: object) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(x, DTensor)


def fsdp_shard(
    model: torch.nn.Module,
    blocks: Sequence[torch.nn.Module],
    device: torch.device,
    param_dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """``fully_shard`` every module of ``blocks`` (innermost first), then ``model`` itself, over a 1-D mesh of every
    rank on ``device``'s type: parameters, gradients and optimizer state are sharded along dim 0. ``param_dtype``
    (bf16) is FSDP2's mixed precision: weights all-gathered in that dtype, gradients reduced in float32, float32
    master weights. Without a process group the model is returned unchanged (one process holds everything)."""
    if not is_initialized():
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (get_world_size(),))
    mp = MixedPrecisionPolicy(
        param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype is not None else None
    )
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def fsdp_clip_grad_norm(parameters: Any, max_norm: float) -> float:
    """``clip_grad_norm_`` over (possibly sharded) parameters: the global norm before clipping, the same on every
    rank (over DTensor shards torch reduces the per-shard norms across the mesh)."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    if _is_dtensor(norm):
        norm = norm.full_tensor()  # type: ignore[attr-defined]
    return float(norm)


def fsdp_full_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """The full (unsharded) state dict on the CPU, gathered from the shards: a collective, every rank calls it;
    rank 0 gets every tensor, the other ranks an empty dict."""
    if not is_initialized() or not any(_is_dtensor(p) for p in model.parameters()):
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full: dict[str, Any] = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    return full


def fsdp_local_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """This rank's share of the model and optimizer state, without communication: ``tensors`` (flat names ->
    this rank's local piece, on the CPU) and ``meta`` (JSON: for each tensor whether it is sharded along dim 0 and its
    global shape; the optimizer's non-tensor state and param groups). Names: ``model/<fqn>``,
    ``optim/<fqn>/<state>``; the optimizer state is keyed by parameter name (torch's ``get_state_dict``)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    both: Any = get_state_dict(model, optimizer)  # sharded (DTensor) values under FSDP2
    model_sd, optim_sd = both
    tensors: dict[str, Tensor] = {}
    shapes: dict[str, Any] = {}

    def put(name: str, v: Tensor) -> None:
        local = v.to_local() if _is_dtensor(v) else v  # type: ignore[attr-defined]
        tensors[name] = local.detach().cpu().contiguous()
        shapes[name] = {"sharded": _is_dtensor(v), "shape": list(v.shape)}

    for k, v in model_sd.items():
        put(f"model/{k}", v)
    other: dict[str, dict[str, Any]] = {}
    for fqn, st in optim_sd["state"].items():
        for name, v in st.items():
            if isinstance(v, Tensor):
                put(f"optim/{fqn}/{name}", v)
            else:
                other.setdefault(str(fqn), {})[name] = v
    meta = {"tensors": shapes, "optim_other": other, "param_groups": optim_sd["param_groups"]}
    return tensors, meta


def fsdp_load_full_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_sd: dict[str, Tensor],
    optim_sd: dict[str, Any],
) -> None:
    """Load FULL model and optimizer state dicts (every rank holds all of them, as read from the checkpoint) into the
    (sharded) model and optimizer; each rank keeps its own shard. No communication."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model,
        optimizer,
        model_state_dict=dict[str, Any](model_sd),
        optim_state_dict=optim_sd,
        options=StateDictOptions(full_state_dict=is_initialized(), strict=True),
    )
