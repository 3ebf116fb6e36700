"""Gradient caching is exact with dropout ON, under DDP and DeepSpeed ZeRO-2 (2 ranks, gloo, float64).

The real trainer's cached step is compared with an independent full-graph reference (see
``tests/distributed/grad_cache_program.py``). The test fails if dropout is off (two train-mode forwards must differ)
or if the RNG replay is wrong (with the replay sabotaged the difference must be far above the tolerance).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.integration.trainrun import check, run_group, torchrun_cmd, write_config

pytestmark = pytest.mark.slow

TOL = 1e-10
PROG = "tests.distributed.grad_cache_program"


def _run(
    tmp_path: Path,
    bible_data: Path,
    model_dir: Path,
    nproc: int,
    name: str,
    *extra: str,
    loss: dict | None = None,
    **train,
) -> list:
    (tmp_path / name).mkdir(parents=True, exist_ok=True)
    cfg = write_config(
        tmp_path / name,
        bible_data,
        model_dir,
        model={"dropout": 0.1},
        loss=loss or {},
        train={"precision": "fp64", "lr": 1e-3, "max_grad_norm": 0.0, "grad_cache_chunk_size": 2, **train},
        tracking={"enabled": False},
    )
    out = tmp_path / name / "out"
    cmd = [sys.executable, "-m", PROG] if nproc == 1 else torchrun_cmd(nproc, module=PROG)
    check(run_group([*cmd, str(cfg), str(out), *extra], 900))
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def test_gradient_caching_with_dropout_is_exact_under_ddp(tmp_path, bible_data, e5_small_model_dir):
    res = _run(tmp_path, bible_data, e5_small_model_dir, 2, "run", strategy="ddp")
    for r in res:
        assert r["dropout_diff"] > 1e-3, r  # dropout is really on
        assert r["loss"] == pytest.approx(r["ref_loss"], abs=TOL)
        assert r["max_param_diff"] <= TOL, r


def test_gradient_caching_with_dropout_under_zero2(tmp_path, bible_data, e5_small_model_dir):
    """DeepSpeed reduces gradients in float32 (and under ZeRO-2 once per chunk), so the float64 reference cannot
    agree to 1e-10: the first AdamW step divides each gradient by its magnitude + 1e-8, which turns float32
    rounding in near-zero gradients into visible parameter differences (~1e-5 of the update). The relative error
    of the whole update is the robust statistic: ~1e-5 with the replay, ~1 with the replay sabotaged."""
    res = _run(tmp_path, bible_data, e5_small_model_dir, 2, "run", strategy="deepspeed", zero_stage=2)
    bad = _run(
        tmp_path, bible_data, e5_small_model_dir, 2, "bad", "sabotage", strategy="deepspeed", zero_stage=2
    )
    for r, b in zip(res, bad, strict=True):
        assert r["dropout_diff"] > 1e-3, r
        assert r["loss"] == pytest.approx(r["ref_loss"], abs=TOL)
        assert r["rel_update_err"] <= 1e-4, r
        assert b["rel_update_err"] > 0.1, b  # wrong masks in the re-forward: a different step
    print(
        "ZeRO-2 relative update error:",
        [r["rel_update_err"] for r in res],
        "sabotaged:",
        [b["rel_update_err"] for b in bad],
    )


def test_sabotaged_rng_replay_is_detected(tmp_path, bible_data, e5_small_model_dir):
    (res,) = _run(tmp_path, bible_data, e5_small_model_dir, 1, "run", "sabotage")
    assert res["dropout_diff"] > 1e-3
    assert res["max_param_diff"] > 1e3 * TOL, res  # fresh masks in the re-forward: not the reference step
    assert res["rel_update_err"] > 0.1, res


def test_micro_batched_erasure_in_the_trainer_is_exact_under_ddp(tmp_path, bible_data, e5_small_model_dir):
    """``loss.erasure_chunk`` through the real ``Trainer.train_step`` (2 ranks, DDP, dropout ON, float64): the
    parameters after the step equal the full-graph reference's (the same program as gradient caching's, with the
    erasure passages encoded first, in micro-batches of 1)."""
    res = _run(
        tmp_path,
        bible_data,
        e5_small_model_dir,
        2,
        "erasure_chunk",
        grad_cache_chunk_size=0,
        loss={"erasure_chunk": 1},
    )
    for r in res:
        assert r["dropout_diff"] > 1e-3, r
        assert r["max_param_diff"] <= TOL, r
        assert abs(r["loss"] - r["ref_loss"]) <= TOL, r
