"""LoRA under DeepSpeed ZeRO-3 (issue #11): the real trainer (Accelerate + DeepSpeed, gloo, torchrun), LoRA adapters
on the 2-layer e5-small, two AdamW steps on the first two global batches split over 2 ranks with ``TrainBatch.shard``,
against one ZeRO-3 process and against the float64 DDP process on the full batches; then the merged final model that
the 2 ranks gathered and saved loads in sentence-transformers and gives the embeddings of the PEFT model holding the
gathered adapters.

Two steps, because LoRA's B starts at zero: the first step moves only B (A's gradient is B^T(...) = 0), the second
moves A as well. ZeRO-3 trains in float32 whatever ``train.precision`` says (its partitions are float32; see
tests/integration/test_family_matrix.py and docs/backbones.md), so the statistics are those of that test: the
relative error of the adapters' update ||p - p_ref|| / ||p_ref - p_0|| and the largest single difference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.integration.trainrun import one_trainer_step, write_config

pytestmark = pytest.mark.slow

LR = 1e-3
LORA = {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["query", "value", "dense"]}
TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "Au commencement, Dieu créa les cieux et la terre.",
]


def _rel(p: dict, ref: dict, p0: dict, keys: list[str]) -> float:
    err = sum(float(((p[k].double() - ref[k].double()) ** 2).sum()) for k in keys)
    upd = sum(float(((ref[k].double() - p0[k].double()) ** 2).sum()) for k in keys)
    return (err / upd) ** 0.5


def _max(p: dict, ref: dict, keys: list[str]) -> float:
    return max(float((p[k].double() - ref[k].double()).abs().max()) for k in keys)


def test_lora_zero3_two_ranks_equal_one_process_and_merged_model_loads(
    tmp_path, bible_data, e5_small_model_dir
):
    from sentence_transformers import SentenceTransformer

    from lancer_dist.config import load_config
    from lancer_dist.data.collate import Collator
    from lancer_dist.model import BiEncoder, load_tokenizer

    runs = {}
    for name, nproc, train in (
        ("ddp-1", 1, {}),
        ("zero3-1", 1, {"strategy": "deepspeed", "zero_stage": 3}),
        ("zero3-2", 2, {"strategy": "deepspeed", "zero_stage": 3}),
    ):
        d = tmp_path / name
        d.mkdir()
        cfg = write_config(
            d,
            bible_data,
            e5_small_model_dir,
            model={"lora": LORA},
            train={"lr": LR, "precision": "fp64", **train},
        )
        m, p = one_trainer_step(
            d / "out", cfg, nproc, steps=2, save_final=name == "zero3-2", torchrun=bool(train)
        )
        runs[name] = (cfg, m, p)
    _, m_ref, p_ref = runs["ddp-1"]
    _, m1, p1 = runs["zero3-1"]
    cfg2, m2, p2 = runs["zero3-2"]
    assert p_ref.keys() == p1.keys() == p2.keys()
    lora = sorted(k for k in p_ref if ".lora_" in k)
    base = sorted(k for k in p_ref if ".lora_" not in k)
    assert lora and base

    # the weights before the steps: the base from the saved model, A as PEFT initialises it, B zero
    run = load_config(str(cfg2))
    torch.manual_seed(run.train.seed)
    init = BiEncoder.from_config(run.model)
    p0 = {k: v.detach() for k, v in init.named_parameters()}
    assert all(float(p0[k].abs().max()) == 0 for k in lora if ".lora_B." in k)
    moved_a = max(float((p_ref[k].double() - p0[k].double()).abs().max()) for k in lora if ".lora_A." in k)
    moved_b = max(float(p_ref[k].abs().max()) for k in lora if ".lora_B." in k)
    assert moved_a > 1e-4 and moved_b > 1e-4  # two steps moved both A and B
    assert moved_a < 3 * LR  # two Adam steps of ~lr each: p0 really is the trainer's initialisation

    for k in ("loss/total", "loss/retrieval", "loss/erasure"):
        assert m2[k] == pytest.approx(m1[k], abs=1e-5), k  # step 2 after float32 step-1 updates: ~1e-7 seen
        assert m1[k] == pytest.approx(m_ref[k], abs=1e-4), k
    # frozen base weights: untouched (float32 rounding of the float64 originals under ZeRO-3)
    assert _max(p2, p_ref, base) <= 1e-6 and _max(p1, p_ref, base) <= 1e-6
    r12, d12 = _rel(p2, p1, p0, lora), _max(p2, p1, lora)
    r2, d2 = _rel(p2, p_ref, p0, lora), _max(p2, p_ref, lora)
    r1 = _rel(p1, p_ref, p0, lora)
    print(
        f"LoRA under ZeRO-3, adapters after 2 AdamW steps (lr {LR}): 2 ranks vs 1 ZeRO-3 process: max {d12:.1e} "
        f"rel {r12:.1e}; vs float64 DDP: 2 ranks max {d2:.1e} rel {r2:.1e}, 1 process rel {r1:.1e}"
    )
    assert r12 <= 1e-4 and d12 <= 2e-5
    assert r2 <= 1e-3 and r1 <= 1e-3  # float32 training vs float64: 6.4e-5 measured

    # the merged final model (gathered from the 2 ranks' ZeRO-3 partitions) in sentence-transformers == the PEFT
    # model holding the gathered adapters, through lancer's own text rule
    final = Path(run.output_dir) / "final_model"
    peft_model = BiEncoder.from_config(run.model)
    missing, unexpected = peft_model.load_state_dict({k: v.float() for k, v in p2.items()}, strict=False)
    assert not unexpected and all("position_ids" in k for k in missing)
    tok = load_tokenizer(run.model)
    coll = Collator.from_config(run.model, tok)
    with torch.no_grad():
        q = peft_model.encode(*coll.queries(TEXTS), is_query=True).numpy()
        p = peft_model.encode(*coll.passages(TEXTS)).numpy()
        with peft_model.query_backbone.disable_adapter():
            p_base = peft_model.encode(*coll.passages(TEXTS)).numpy()
    assert np.abs(p - p_base).max() > 1e-4  # the adapters changed the embeddings: a lost merge would show
    st = SentenceTransformer(str(final), device="cpu")
    eq = st.encode(TEXTS, prompt_name="query", convert_to_numpy=True)
    ep = st.encode(TEXTS, prompt_name="passage", convert_to_numpy=True)
    assert np.abs(eq - q).max() <= 1e-5 and np.abs(ep - p).max() <= 1e-5
    assert not any("lora" in k or "base_layer" in k for k in _saved_keys(final))  # a plain, merged model


def _saved_keys(model_dir: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return list(f.keys())
