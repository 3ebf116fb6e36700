"""FSDP2 (``train.strategy: fsdp``, issue #11) in the real trainer, 2 gloo ranks on CPU, a tiny random-init BERT:

* kill + resume is exact: SIGKILL a 2-rank FSDP2 run after its step-2 sharded checkpoint, resume, and the final model
  equals an uninterrupted run's (bit for bit in float64); the gathered final model is a normal model directory that
  sentence-transformers loads; a 2-rank sharded checkpoint loads into one process (re-assembled shards).

N ranks == one process under FSDP2, for every backbone family: tests/integration/test_family_matrix.py.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.integration.trainrun import (
    check,
    complete_checkpoints,
    kill_group,
    run_train,
    start_group,
    torchrun_cmd,
    write_config,
)

pytestmark = pytest.mark.slow


def _backbone(vocab: int) -> dict:
    return {
        "backbone_config": {
            "model_type": "bert",
            "vocab_size": vocab,
            "hidden_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 32,
            "max_position_embeddings": 64,
        },
        "pooling": "mean",
    }


def _config(tmp: Path, bible: Path, model_dir: Path, **sections) -> Path:
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    model = {**_backbone(vocab), "tokenizer": str(model_dir), **sections.pop("model", {})}
    tmp.mkdir(parents=True, exist_ok=True)
    return write_config(tmp, bible, model_dir, model=model, **sections)


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    for k in a:  # full (gathered) parameters, not shards
        assert a[k].shape == b[k].shape, k
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _wait_for_checkpoint(ckpt_dir: Path, step: int, proc, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not any(p.name == f"step-{step:08d}" for p in complete_checkpoints(ckpt_dir)):
        if proc.poll() is not None:
            _out, err = proc.communicate()
            raise AssertionError(f"training ended early ({proc.returncode}):\n{err[-6000:]}")
        assert time.monotonic() - t0 < timeout, f"no step-{step} checkpoint in {ckpt_dir} after {timeout}s"
        time.sleep(0.1)


STEPS = 4


def _sections(steps: int = STEPS, strategy: str = "fsdp") -> dict:
    train = {
        "strategy": strategy,
        "precision": "fp64",
        "steps": steps,
        "lr": 1e-3,
        "checkpoint": {"every": 2},
    }
    return {"train": train}


@pytest.fixture(scope="module")
def fsdp_ref(tmp_path_factory, bible_data, e5_small_model_dir) -> Path:
    """An uninterrupted 2-rank FSDP2 run of 4 steps (float64), checkpoints at steps 2 and 4: its directory."""
    ref_dir = tmp_path_factory.mktemp("fsdp-ref")
    check(run_train(_config(ref_dir, bible_data, e5_small_model_dir, **_sections()), nproc=2))
    return ref_dir


def test_fsdp_sigkill_and_resume_is_exact(tmp_path, bible_data, e5_small_model_dir, fsdp_ref):
    steps, sections = STEPS, _sections()
    ref_dir, kill_dir = fsdp_ref, tmp_path / "kill"

    cfg = _config(kill_dir, bible_data, e5_small_model_dir, **sections)
    proc = start_group(torchrun_cmd(2, "train", "--config", str(cfg)))
    try:
        _wait_for_checkpoint(kill_dir / "run/checkpoints", 2, proc)
        kill_group(proc)  # torchrun and both ranks, no chance to clean up
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert not (kill_dir / "run/final_model").exists()
    ckpt = complete_checkpoints(kill_dir / "run/checkpoints")[0]
    # sharded: one safetensors shard per rank, each holding about half of every sharded weight
    shards = sorted((ckpt / "fsdp").glob("rank*.safetensors"))
    assert [s.name for s in shards] == ["rank00000.safetensors", "rank00001.safetensors"]
    pieces = [load_file(str(s)) for s in shards]
    meta = json.loads((ckpt / "fsdp" / "rank00000.json").read_text())["tensors"]
    name = next(k for k, v in meta.items() if v["sharded"] and k.startswith("model/") and v["shape"][0] >= 16)
    assert pieces[0][name].shape[0] < meta[name]["shape"][0]
    assert pieces[0][name].shape[0] + pieces[1][name].shape[0] == meta[name]["shape"][0]

    resumed = run_train(cfg, nproc=2)
    check(resumed)
    assert "resumed from" in resumed.stderr
    final_ref = _final(ref_dir)
    final = load_file(str(kill_dir / "run/final_model/model.safetensors"))
    diff = _max_diff(final_ref, final)
    h_ref = json.loads((ref_dir / "run/history.json").read_text())
    h_res = json.loads((kill_dir / "run/history.json").read_text())
    print(f"FSDP2 kill + resume vs uninterrupted, max |param diff| after {steps} steps: {diff:.2e}")
    assert diff <= 1e-12, diff
    # the resumed process logged the steps after its checkpoint; they match the uninterrupted run's
    assert h_res and min(h["step"] for h in h_res) > 2
    for h in h_res:
        ref = next(r for r in h_ref if r["step"] == h["step"])
        assert h["loss/total"] == pytest.approx(ref["loss/total"], abs=1e-12)
    _check_final_model(kill_dir / "run/final_model", cfg)
    _check_loads_on_one_process(complete_checkpoints(ref_dir / "run/checkpoints")[-1], final_ref, cfg)


def _final(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "run/final_model/model.safetensors"))


def test_fsdp_resume_on_another_world_size_is_exact(tmp_path, bible_data, e5_small_model_dir, fsdp_ref):
    """A 2-rank FSDP2 checkpoint resumed on 1 process, and a 1-process FSDP2 checkpoint resumed on 2 ranks, end with
    the weights of the uninterrupted 2-rank run (the shards of every saved rank are re-assembled and re-sharded;
    float64: 1e-10, the bound of 2 ranks vs 1 process in the family matrix)."""
    final_ref = _final(fsdp_ref)
    ckpt2 = complete_checkpoints(fsdp_ref / "run/checkpoints")[0]
    assert (
        ckpt2.name == "step-00000002"
        and json.loads((ckpt2 / "trainer_state.json").read_text())["world_size"] == 2
    )

    one = tmp_path / "2to1"
    cfg = _config(one, bible_data, e5_small_model_dir, **_sections())
    proc = run_train(cfg, f"train.checkpoint.resume={ckpt2}", nproc=1)
    check(proc)
    assert "resuming a 2-rank checkpoint on 1 ranks" in proc.stderr and "resumed from" in proc.stderr
    d21 = _max_diff(final_ref, _final(one))

    # a 1-process FSDP2 run (the same 4 steps: the lr schedule depends on train.steps), its step-2 checkpoint (one
    # shard) resumed on 2 ranks
    first = tmp_path / "1-first"
    check(run_train(_config(first, bible_data, e5_small_model_dir, **_sections()), nproc=1))
    ckpt1 = complete_checkpoints(first / "run/checkpoints")[0]
    shards = [p.name for p in (ckpt1 / "fsdp").glob("*.safetensors")]
    assert ckpt1.name == "step-00000002" and shards == ["rank00000.safetensors"]
    two = tmp_path / "1to2"
    cfg = _config(two, bible_data, e5_small_model_dir, **_sections())
    proc = run_train(cfg, f"train.checkpoint.resume={ckpt1}", nproc=2)
    check(proc)
    assert "resuming a 1-rank checkpoint on 2 ranks" in proc.stderr
    d12 = _max_diff(final_ref, _final(two))
    # both resumed runs trained steps 3 and 4 only (a run that started over would log steps 1 and 2 too)
    for d in (one, two):
        assert [h["step"] for h in json.loads((d / "run/history.json").read_text())] == [3.0, 4.0]
    print(
        f"FSDP2 resume on another world size vs the uninterrupted 2-rank run: 2->1 {d21:.1e}, 1->2 {d12:.1e}"
    )
    assert d21 <= 1e-10 and d12 <= 1e-10


@pytest.mark.parametrize("saved", ["ddp", "fsdp"])
def test_resume_under_another_strategy_is_refused(tmp_path, bible_data, e5_small_model_dir, fsdp_ref, saved):
    """A DDP checkpoint resumed under FSDP2, and an FSDP2 checkpoint under DDP: a clear error naming the field, the
    checkpoint, both strategies and both world sizes, before anything is loaded (each strategy stores the model and
    optimizer state in its own layout; the DeepSpeed pairs: tests/unit/test_checkpoint_strategy.py)."""
    if saved == "fsdp":
        ckpt = complete_checkpoints(fsdp_ref / "run/checkpoints")[0]
        want = "written by FSDP2 on 2 rank(s), and this run is DDP on 1 rank(s)"
    else:
        first = tmp_path / "ddp"
        check(run_train(_config(first, bible_data, e5_small_model_dir, **_sections(2, "ddp")), nproc=1))
        ckpt = complete_checkpoints(first / "run/checkpoints")[-1]
        want = "written by DDP on 1 rank(s), and this run is FSDP2 on 1 rank(s)"
    now = "ddp" if saved == "fsdp" else "fsdp"
    out = tmp_path / "resumed"
    cfg = _config(out, bible_data, e5_small_model_dir, **_sections(strategy=now))
    proc = run_train(cfg, f"train.checkpoint.resume={ckpt}", nproc=1)
    assert proc.returncode != 0
    err = " ".join(proc.stderr.split())
    assert "config field 'train.strategy'" in err and str(ckpt) in err and want in err, proc.stderr[-3000:]
    assert "resumed from" not in proc.stderr and not (out / "run/final_model").exists()


def _check_loads_on_one_process(ckpt: Path, final: dict[str, torch.Tensor], cfg: Path) -> None:
    """The last 2-rank sharded checkpoint, loaded into a plain model in this process (another world size: the
    shards are re-assembled), holds exactly the weights of the final model the 2 ranks gathered and saved."""
    from lancer_dist.config import load_config
    from lancer_dist.model import BiEncoder
    from lancer_dist.train.fsdp_state import load_fsdp_state
    from lancer_dist.train.trainer import build_optimizer

    run = load_config(str(cfg))
    model = BiEncoder.from_config(run.model).double()
    load_fsdp_state(ckpt, model, build_optimizer(model, run))
    loaded = model.query_backbone.state_dict()
    assert final and all(torch.equal(loaded[k], v) for k, v in final.items())


def _check_final_model(out: Path, cfg: Path) -> None:
    """The gathered final model is a normal model directory: exactly the unsharded backbone's weights (no shard or
    wrapper names; transformers would silently re-initialise a missing one), and sentence-transformers gives
    lancer's embeddings."""
    import numpy as np
    from sentence_transformers import SentenceTransformer

    from lancer_dist.config import load_config
    from lancer_dist.model import BiEncoder
    from lancer_dist.retrieval.encoder_io import EncoderSpec, load_encoder

    plain = BiEncoder.from_config(load_config(str(cfg)).model).query_backbone
    saved = load_file(str(out / "model.safetensors"))
    assert {k for k, _ in plain.named_parameters()} <= set(saved) <= set(plain.state_dict())
    assert all(saved[k].shape == v.shape for k, v in plain.state_dict().items() if k in saved)
    texts = [
        "In the beginning God created the heaven and the earth.",
        "Au commencement, Dieu créa les cieux.",
    ]
    ours = load_encoder(EncoderSpec(str(out)), device="cpu")
    st = SentenceTransformer(str(out), device="cpu")
    for is_query, name in ((True, "query"), (False, "passage")):
        a = ours.encode(texts, is_query=is_query)
        b = st.encode(texts, prompt_name=name, convert_to_numpy=True)
        assert np.abs(a - b).max() <= 1e-5, name
