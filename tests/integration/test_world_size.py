"""The same run on any number of ranks, through the CLI (``lancer train`` / ``torchrun -m lancer_dist.cli train``)
on configs/tiny.yaml in float64: 1 process, 2 ranks and 3 ranks, with ``data.num_workers`` 0 and 2, end with the
same weights; a 2-rank run killed (SIGKILL) after its step-2 checkpoint resumes on 1 rank and on 3 ranks to the
weights of the uninterrupted run. DDP (float64: 1e-10) and ZeRO-2 (float32 master weights: 1e-6; the resume goes
through DeepSpeed's universal checkpoint).

Global batch: 6 queries (groups of 2) and 3 passages of each of 4 languages per step (1, 2 and 3 divide both)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.trainrun import REPO, check, kill_group, run_group, start_group, torchrun_cmd

pytestmark = pytest.mark.slow

STEPS = 4
# DDP: float64 end to end. ZeRO-2: DeepSpeed keeps its master weights and Adam moments in float32 whatever the
# model dtype, so runs whose gradient sums differ in rounding (another world size) agree to float32 precision only
# (measured: 4.6e-7); a world-size-dependent global batch moves the weights by ~1e-3 (issue #17).
TOL = {"ddp": 1e-10, "deepspeed": 1e-6}


def _overrides(out: Path, bible: Path | str, workers: int, strategy: str, *extra: str) -> list[str]:
    return [
        f"output_dir={out}",
        f"train.checkpoint.dir={out / 'checkpoints'}",
        f"train.steps={STEPS}",
        "train.precision=fp64",
        "train.checkpoint.every=2",
        "train.checkpoint.keep_last=4",
        f"train.strategy={strategy}",
        "train.zero_stage=2",
        f"data.retrieval.path={bible}/retrieval",
        f"data.erasure.path={bible}/erasure",
        "data.retrieval.queries_per_step=6",
        "data.erasure.passages_per_language=3",
        f"data.num_workers={workers}",
        "probe.enabled=false",
        "tracking.enabled=false",
        *extra,
    ]


def _cmd(nproc: int, args: list[str]) -> list[str]:
    base = ["train", "--config", str(REPO / "configs" / "tiny.yaml"), *args]
    if nproc == 0:  # plain `lancer train`: one process, no torchrun
        return [sys.executable, "-m", "lancer_dist.cli", *base]
    return torchrun_cmd(nproc, *base)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final_model" / "model.safetensors"))


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _kill_after_checkpoint(cmd: list[str], ckpt: Path, timeout: float = 600) -> None:
    """Start a run and SIGKILL its whole process group once ``ckpt`` is complete (somewhere in step 3)."""
    proc = start_group(cmd)
    try:
        t0 = time.time()
        while not (ckpt / "trainer_state.json").is_file():
            if proc.poll() is not None:
                _out, err = proc.communicate()
                raise AssertionError(f"run ended before {ckpt} ({proc.returncode}):\n{err[-6000:]}")
            assert time.time() - t0 < timeout, f"no {ckpt} after {timeout}s"
            time.sleep(0.1)
        kill_group(proc)
    finally:
        if proc.poll() is None:
            kill_group(proc)


# (nproc, num_workers) of the uninterrupted runs; nproc 0 = `lancer train` without torchrun. ZeRO-2 runs under
# torchrun (DeepSpeed needs the process-group environment even for one rank).
# ZeRO-2 has one uninterrupted run (1 rank): the killed 2-rank run (steps 1-2 on 2 ranks) resumed on 1 rank, and
# resumed on 3 ranks with 2 loader workers (steps 3-4 on 3 ranks), must both end at its weights, which covers 2 and 3
# ranks under ZeRO-2 (two uninterrupted 2- and 3-rank ZeRO-2 runs here cost ~40 s of CI and added no claim: world-size
# invariance of the data with loader workers from step 1 is the DDP plan's, the same pipeline for every strategy).
PLANS = {
    "ddp": {"runs": [(0, 0), (2, 2), (3, 0)], "resume": [(1, 2), (3, 0)], "one": 0},
    "deepspeed": {"runs": [(1, 0)], "resume": [(1, 0), (3, 2)], "one": 1},
}


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_same_weights_on_1_2_3_ranks_and_resume_on_another_world_size(
    tmp_path: Path, bible_data: Path, e5_model_dir: Path, strategy: str
) -> None:
    del e5_model_dir  # built on demand: configs/tiny.yaml uses its tokenizer
    plan = PLANS[strategy]
    finals: dict[str, dict[str, torch.Tensor]] = {}
    for nproc, workers in plan["runs"]:
        name = f"n{nproc}-w{workers}"
        out = tmp_path / name
        check(run_group(_cmd(nproc, _overrides(out, bible_data, workers, strategy)), 900))
        finals[name] = _weights(out)

    # a 2-rank run (0 workers) killed after its step-2 checkpoint, resumed on 1 and on 3 ranks
    killed = tmp_path / "killed"
    ckpt = killed / "checkpoints" / "step-00000002"
    _kill_after_checkpoint(_cmd(2, _overrides(killed, bible_data, 0, strategy)), ckpt)
    assert not (killed / "final_model").exists()
    for nproc, workers in plan["resume"]:
        name = f"resumed-n{nproc}-w{workers}"
        out = tmp_path / name
        proc = run_group(
            _cmd(nproc, _overrides(out, bible_data, workers, strategy, f"train.checkpoint.resume={ckpt}")),
            900,
        )
        check(proc)
        assert "resuming a 2-rank checkpoint on" in proc.stderr and "resumed from" in proc.stderr
        finals[name] = _weights(out)

    ref_name = f"n{plan['one']}-w0"
    ref = finals[ref_name]
    diffs = {name: _max_diff(ref, w) for name, w in finals.items()}
    print(
        f"{strategy}: max |param diff| vs {ref_name}: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items())
    )
    assert all(v <= TOL[strategy] for v in diffs.values()), diffs
    # the runs really trained: 4 logged steps, and the weights moved away from the step-2 checkpoint
    hist = json.loads((tmp_path / ref_name / "history.json").read_text())
    assert [h["step"] for h in hist] == [1.0, 2.0, 3.0, 4.0]
    if strategy == "ddp":  # Accelerate's checkpoint holds the wrapped bi-encoder (query_backbone.<name>)
        at2 = load_file(str(ckpt / "model.safetensors"))
        moved = [float((ref[k] - at2[f"query_backbone.{k}"]).abs().max()) for k in ref]
        assert len(moved) == len(ref) and max(moved) > 1e-4


def test_a_run_reading_shards_over_http_killed_and_resumed_equals_the_local_run(
    tmp_path: Path, bible_data: Path, e5_model_dir: Path
) -> None:
    """Issue #12: shards streamed from an HTTP server (127.0.0.1, started here); a 2-rank run SIGKILLed after its
    step-2 checkpoint and resumed from the same URLs ends with the weights of an uninterrupted run on the local
    files (DDP, float64)."""
    from tests.servers import FileHttpServer

    del e5_model_dir  # built on demand: configs/tiny.yaml uses its tokenizer
    local = tmp_path / "local"
    check(run_group(_cmd(2, _overrides(local, bible_data, 0, "ddp")), 900))
    with FileHttpServer(bible_data, tmp_path / "http.log") as srv:
        killed = tmp_path / "killed"
        ckpt = killed / "checkpoints" / "step-00000002"
        _kill_after_checkpoint(_cmd(2, _overrides(killed, srv.url, 2, "ddp")), ckpt)
        assert not (killed / "final_model").exists()
        resumed = tmp_path / "resumed"
        proc = run_group(
            _cmd(2, _overrides(resumed, srv.url, 2, "ddp", f"train.checkpoint.resume={ckpt}")), 900
        )
        check(proc)
        assert "resumed from" in proc.stderr
        fetched = {path for path, status in srv.requests() if status == 200}
    assert any(p.endswith(".tar") for p in fetched), sorted(fetched)[:5]  # the shards really came over HTTP
    diff = _max_diff(_weights(local), _weights(resumed))
    print(f"http, killed at step 2 and resumed vs local uninterrupted: max |param diff| {diff:.1e}")
    assert diff <= TOL["ddp"], diff
