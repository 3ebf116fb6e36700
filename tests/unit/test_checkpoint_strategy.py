"""A checkpoint resumes only under the parallel strategy that wrote it (issue #11): each strategy stores the model and
optimizer state in its own layout and none reads another's, so any other pair is refused with a ConfigError naming
``train.strategy``, the checkpoint, both strategies and both world sizes (``check_resume_strategy``). The strategy is
read from the trainer state the checkpoint records, or, for a checkpoint written before that record, from its
layout. The DDP <-> FSDP2 pairs through ``lancer train``: tests/integration/test_fsdp.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from lancer_dist.config import ConfigError, load_config
from lancer_dist.train.trainer import check_resume_strategy, run_strategy, saved_strategy

TINY = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")


def _cfg(strategy: str, stage: int = 2):
    return load_config(TINY, [f"train.strategy={strategy}", f"train.zero_stage={stage}"])


def _ckpt(tmp_path: Path, layout: str) -> Path:
    d = tmp_path / layout
    (d / {"fsdp": "fsdp", "deepspeed": "pytorch_model", "ddp": "."}[layout]).mkdir(
        parents=True, exist_ok=True
    )
    return d


RUNS = {
    "ddp": ("ddp", 2),
    "fsdp": ("fsdp", 2),
    "zero1": ("deepspeed", 1),
    "zero2": ("deepspeed", 2),
    "zero3": ("deepspeed", 3),
}
# ZeRO stages 0-2 share DeepSpeed's checkpoint format (whole parameters, partitioned optimizer state); ZeRO-3 also
# partitions the parameters
SAME = {frozenset({"zero1", "zero2"})}


@pytest.mark.parametrize("saved", list(RUNS))
@pytest.mark.parametrize("now", list(RUNS))
def test_only_the_strategy_that_wrote_a_checkpoint_resumes_it(tmp_path, saved, now):
    ckpt = tmp_path / "step-00000002"
    ckpt.mkdir()
    state = {"world_size": 2, **run_strategy(_cfg(*RUNS[saved]))}
    if saved == now or frozenset({saved, now}) in SAME:
        check_resume_strategy(ckpt, state, _cfg(*RUNS[now]), 3)
        return
    with pytest.raises(ConfigError) as e:
        check_resume_strategy(ckpt, state, _cfg(*RUNS[now]), 3)
    msg = str(e.value)
    names = {"ddp": "DDP", "fsdp": "FSDP2", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}
    assert "config field 'train.strategy'" in msg and str(ckpt) in msg
    assert f"written by {'DeepSpeed ' if 'zero' in saved else ''}{names[saved]} on 2 rank(s)" in msg
    assert f"this run is {'DeepSpeed ' if 'zero' in now else ''}{names[now]} on 3 rank(s)" in msg


@pytest.mark.parametrize("layout", ["ddp", "fsdp", "deepspeed"])
def test_a_checkpoint_without_the_record_is_read_from_its_layout(tmp_path, layout):
    ckpt = _ckpt(tmp_path, layout)
    assert saved_strategy(ckpt, {"world_size": 2})["strategy"] == layout
    for other in ("ddp", "fsdp", "deepspeed"):
        cfg = _cfg(other, 3)
        if other == layout:  # the ZeRO stage of an old DeepSpeed checkpoint is unknown: not refused for it
            check_resume_strategy(ckpt, {"world_size": 2}, cfg, 2)
        else:
            with pytest.raises(ConfigError, match=r"train\.strategy"):
                check_resume_strategy(ckpt, {"world_size": 2}, cfg, 2)
