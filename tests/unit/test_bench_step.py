"""benchmarks/bench_step.py times the real ``Trainer.train_step`` (issue #15), not a copy of it: its timers, attached
to a trainer from outside, see every phase of one real step, and the step's own result is unchanged by them."""

from __future__ import annotations

import torch

from lancer_dist.config import load_config
from tests.benchmark_scripts import load_benchmark
from tests.integration.trainrun import write_config


def test_the_benchmark_times_every_phase_of_the_real_step(tmp_path, bible_data, e5_small_model_dir):
    from lancer_dist.train.trainer import Trainer

    bench = load_benchmark("bench_step")
    cfg_path = write_config(tmp_path, bible_data, e5_small_model_dir, tracking={"enabled": False})
    cfg = load_config(cfg_path, [])
    plain, timed = Trainer(load_config(cfg_path, [f"output_dir={tmp_path / 'plain'}"])), Trainer(cfg)
    timers = bench.StepTimers()
    erasure_inputs: list = []
    bench.instrument(timed, timers, erasure_inputs)
    b_plain, b_timed = next(iter(plain.stream)), next(iter(timed.stream))
    m_plain, m_timed = plain.train_step(b_plain), timed.train_step(b_timed)
    phases = timers.take()
    # every phase of the real step was seen, and they fit inside the step the trainer itself timed
    assert set(phases) == {"forward", "loss", "collectives", "backward", "optimizer"}, phases
    assert all(v > 0 for v in phases.values()), phases
    inner = phases["forward"] + phases["loss"] + phases["backward"] + phases["optimizer"]
    assert inner <= m_timed["step_time_s"] and phases["collectives"] <= phases["loss"]
    # the erasure embeddings handed to the loss were kept (the L_C share is timed on them)
    ((x, langs),) = erasure_inputs
    assert x.shape[0] == len(langs) == b_timed.erasure_input_ids.shape[0]
    assert bench.erasure_seconds(timed, x, langs) > 0
    # the timers change nothing: same losses and parameters as an untimed trainer on the same batch
    for k in ("loss/total", "loss/retrieval", "loss/erasure"):
        assert m_timed[k] == m_plain[k], k
    for (n, p), (_, q) in zip(plain.model.named_parameters(), timed.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n
