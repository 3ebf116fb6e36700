"""Device rules: which device collective tensors live on, the batch move, and collectives of Python numbers over
a real 2-rank gloo group (every caller hands numbers, dist.py makes the tensors)."""

from __future__ import annotations

import dataclasses
import signal

import pytest
import torch

from lancer_dist import dist
from lancer_dist.config import ConfigError, RunConfig
from lancer_dist.data.stream import TrainBatch
from tests.distributed.harness import run_distributed


def test_device_for_backends():
    cuda3 = torch.device("cuda", 3)
    assert dist.device_for_backends("cpu:gloo,cuda:gloo") == torch.device("cpu")
    assert dist.device_for_backends("cpu:gloo,cuda:nccl", cuda3) == torch.device("cpu")
    # no CPU backend (NCCL, or a "cuda:gloo" group): CPU tensors would fail, use the current accelerator device
    assert dist.device_for_backends("cuda:nccl", cuda3) == cuda3
    assert dist.device_for_backends("cuda:gloo", cuda3) == cuda3
    assert dist.collective_device() == torch.device("cpu")  # no process group


def test_a_cpu_tensor_in_a_group_without_cpu_backend_fails_like_nccl(tmp_path):
    """Why the rule exists: torch refuses CPU tensors when the group has no CPU backend (as under NCCL)."""
    import torch.distributed as tdist

    port = dist.find_free_port()
    tdist.init_process_group("cuda:gloo", rank=0, world_size=1, init_method=f"tcp://127.0.0.1:{port}")
    try:
        assert str(tdist.get_backend_config()) == "cuda:gloo"
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            tdist.all_reduce(torch.ones(1))
    finally:
        tdist.destroy_process_group()


def _rank_numbers(rank: int, world: int) -> dict:
    from lancer_dist.train.trainer import Preemption

    pre = Preemption()
    if rank == 1:
        pre.signal = signal.SIGTERM  # only rank 1 saw the signal
    x = torch.tensor([float(rank + 1)], dtype=torch.float64)
    return {
        "sum": dist.sum_floats([rank + 1.0, 10.0 * rank]),
        "mean": dist.mean_over_ranks([rank + 1.0]),
        "any_true": dist.any_flag(rank == 1),
        "any_false": dist.any_flag(False),
        "preempt": pre.requested(),
        "all_reduce": dist.all_reduce_sum(x),
        "device": str(dist.collective_device()),
    }


def test_collectives_of_numbers_on_two_ranks(tmp_path):
    res = run_distributed(_rank_numbers, 2, tmp_path)
    for r in res:
        assert r["sum"] == [3.0, 10.0]
        assert r["mean"] == [1.5]
        assert r["any_true"] is True and r["any_false"] is False
        assert r["preempt"] is True  # agreed over ranks
        assert float(r["all_reduce"]) == 3.0
        assert r["device"] == "cpu"


def test_train_batch_to_moves_every_tensor():
    def t(*shape: int) -> torch.Tensor:
        return torch.ones(*shape, dtype=torch.long)

    b = TrainBatch(0, t(2, 3), t(2, 3), t(4, 5), t(4, 5), t(3, 5), t(3, 5), t(3), ["q"], ["d"], ["x"])
    moved = b.to("meta")
    tensor_fields = [f.name for f in dataclasses.fields(b) if isinstance(getattr(b, f.name), torch.Tensor)]
    assert len(tensor_fields) == 7
    for name in tensor_fields:
        assert getattr(moved, name).device.type == "meta", name
        assert getattr(b, name).device.type == "cpu"  # a new batch; the original is untouched
    assert moved.query_keys == ["q"] and moved.step == 0


def test_dist_timeout_is_validated():
    cfg = RunConfig()
    cfg.train.dist_timeout_s = 0
    with pytest.raises(ConfigError, match="dist_timeout_s"):
        cfg.train.validate("train")


def test_gradient_caching_allowed_under_zero2_refused_under_zero3(tmp_path):
    import json

    from lancer_dist.train.parallel import check_launch_config

    cfg = RunConfig()
    cfg.train.grad_cache_chunk_size = 4
    cfg.train.strategy = "deepspeed"
    for stage in (0, 1, 2):
        cfg.train.zero_stage = stage
        check_launch_config(cfg)
    cfg.train.zero_stage = 3
    with pytest.raises(ConfigError, match="ZeRO-3"):
        check_launch_config(cfg)
    # the stage of a user's DeepSpeed JSON wins over train.zero_stage
    ds = tmp_path / "zero3.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    cfg.train.zero_stage, cfg.train.deepspeed_config = 2, str(ds)
    with pytest.raises(ConfigError, match="grad_cache_chunk_size"):
        check_launch_config(cfg)
