"""The real trainer (Accelerate DDP, gloo, float64) on a tiny random decoder embedder (Qwen2 architecture, last-token
pooling, left padding, EOS appended) with and without LoRA: 2 ranks x B/2 == 1 process x B after one AdamW step
(issue #11). The tokenizer is the test e5 one (it has no Qwen vocabulary, but the text rule is the same code)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.trainrun import one_trainer_step, write_config

pytestmark = pytest.mark.slow


def _one_step(tmp_path: Path, cfg: Path, nproc: int, name: str) -> tuple[dict, dict]:
    return one_trainer_step(tmp_path / name, cfg, nproc)


@pytest.mark.parametrize("lora", [False, True])
def test_decoder_ddp_two_ranks_equal_one_process(tmp_path, bible_data, e5_small_model_dir, lora):
    vocab = json.loads((e5_small_model_dir / "config.json").read_text())["vocab_size"]
    model = {
        "backbone_config": {
            "model_type": "qwen2",
            "vocab_size": vocab,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
        },
        "tokenizer": str(e5_small_model_dir),
        "pooling": "last_token",
        "query_instruction": "Given a verse, retrieve related verses",
        "freeze_embeddings": True,
        "lora": {"enabled": lora, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
    }
    cfg = write_config(
        tmp_path, bible_data, e5_small_model_dir, model=model, train={"lr": 1e-3, "precision": "fp64"}
    )
    m1, p1 = _one_step(tmp_path, cfg, 1, "one")
    m2, p2 = _one_step(tmp_path, cfg, 2, "two")
    for k in ("loss/total", "loss/retrieval", "loss/erasure", "grad_norm"):
        assert m2[k] == pytest.approx(m1[k], abs=1e-10), k
    assert m1["loss/erasure"] > 0.01 and m1["grad_norm"] > 0
    assert p1.keys() == p2.keys()
    diff = max(float((p1[k] - p2[k]).abs().max()) for k in p1)
    print(f"decoder (lora={lora}) float64 DDP(2) vs 1 process, max |param diff| after one step: {diff:.2e}")
    assert diff <= 1e-10
    assert any(".lora_" in k for k in p1) == lora
