"""LoRA through PEFT (issue #11): only the adapters train, and the saved final model (adapters merged into the
weights) encodes exactly as the PEFT model did, in lancer's loader and in sentence-transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lancer_dist.config import ConfigError, LoraConfig, ModelConfig, load_config
from lancer_dist.data.collate import Collator
from lancer_dist.model import BiEncoder, prepare_tokenizer
from tests.unit.test_backbones import TEXTS, _backbone_config, _tokenizer, _tokenizer_for

TARGETS = {"bert": ["query", "value"], "qwen2": ["q_proj", "v_proj"]}


def _lora_model(model_type: str, pooling: str, vocab: int, shared: bool = True) -> BiEncoder:
    cfg = ModelConfig(
        backbone_config=_backbone_config(model_type, vocab),
        tokenizer="unused",
        pooling=pooling,  # type: ignore[arg-type]
        normalize=True,
        dropout=0.0,
        shared_towers=shared,
        query_prefix="query: ",
        passage_prefix="passage: ",
        lora=LoraConfig(enabled=True, r=4, alpha=8, target_modules=TARGETS[model_type]),
    )
    torch.manual_seed(0)
    model = BiEncoder.from_config(cfg).eval()
    with torch.no_grad():  # lora_B starts at zero (a no-op adapter): give it values so the merge is visible
        for name, prm in model.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("model_type", ["bert", "qwen2"])
def test_only_lora_parameters_train(model_type):
    tok = prepare_tokenizer(_tokenizer_for(model_type), "mean")
    model = _lora_model(model_type, "mean", len(tok))
    ids, mask = Collator(tok).passages(TEXTS)
    model.train()
    model.encode(ids, mask).pow(2).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad and with_grad <= trainable
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # r * (in + out) per adapted linear layer: 2 layers x 2 targets x 4 x (32 + out)
    out_dims = {"bert": [32, 32], "qwen2": [32, 16]}[model_type]  # qwen2 v_proj: 2 kv heads x head dim 8
    expected = sum(2 * 4 * (32 + o) for o in out_dims)
    assert sum(p.numel() for n, p in model.named_parameters() if p.requires_grad) == expected


@pytest.mark.parametrize(
    ("model_type", "pooling"), [("bert", "mean"), ("bert", "pooler"), ("qwen2", "last_token")]
)
def test_merged_saved_model_equals_the_peft_model(tmp_path, model_type, pooling):
    from sentence_transformers import SentenceTransformer

    from lancer_dist.retrieval.encoder_io import EncoderSpec, load_encoder

    tok = prepare_tokenizer(_tokenizer_for(model_type), pooling)
    model = _lora_model(model_type, pooling, len(tok))
    coll = Collator(tok, query_prefix="query: ", passage_prefix="passage: ")
    with torch.no_grad():
        peft_q = model.encode(*coll.queries(TEXTS), is_query=True).numpy()
        peft_p = model.encode(*coll.passages(TEXTS)).numpy()
        base = model.query_backbone.get_base_model()
        with model.query_backbone.disable_adapter():  # the same model without its adapters
            no_adapter = model.encode(*coll.passages(TEXTS)).numpy()
    assert np.abs(no_adapter - peft_p).max() > 1e-3  # the adapters do change the embeddings
    out = model.save_pretrained(tmp_path / "final", tok)
    saved = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in saved)
    assert set(saved) == {k for k in base.state_dict() if "lora" not in k and "base_layer" not in k} | {
        k.replace(".base_layer", "") for k in base.state_dict() if "base_layer" in k
    }
    # the trainer saves from the full state dict it gathered (ZeRO-3): the same merged weights
    from_sd = load_file(
        str(
            model.save_pretrained(tmp_path / "from_sd", tok, state_dict=model.state_dict())
            / "model.safetensors"
        )
    )
    assert set(from_sd) == set(saved) and all(torch.equal(from_sd[k], saved[k]) for k in saved)
    ours = load_encoder(EncoderSpec(str(out)), device="cpu")
    assert not hasattr(ours.model.query_backbone, "peft_config")  # a plain transformers model
    assert np.abs(ours.encode(TEXTS, is_query=True) - peft_q).max() <= 1e-5
    assert np.abs(ours.encode(TEXTS, is_query=False) - peft_p).max() <= 1e-5
    st = SentenceTransformer(str(out), device="cpu")
    assert np.abs(st.encode(TEXTS, prompt_name="query", convert_to_numpy=True) - peft_q).max() <= 1e-5
    assert np.abs(st.encode(TEXTS, prompt_name="passage", convert_to_numpy=True) - peft_p).max() <= 1e-5


def test_two_tower_lora_saves_both_towers_merged(tmp_path):
    from lancer_dist.retrieval.encoder_io import EncoderSpec, load_encoder

    tok = prepare_tokenizer(_tokenizer(decoder=False), "cls")
    model = _lora_model("bert", "cls", len(tok), shared=False)
    with torch.no_grad():
        for name, prm in model.passage_backbone.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, 0.2)  # the towers' adapters differ
        coll = Collator(tok, query_prefix="query: ", passage_prefix="passage: ")
        q = model.encode(*coll.queries(TEXTS), is_query=True).numpy()
        p = model.encode(*coll.passages(TEXTS)).numpy()
    out = model.save_pretrained(tmp_path / "final", tok)
    ours = load_encoder(EncoderSpec(str(out)), device="cpu")
    assert np.abs(ours.encode(TEXTS, is_query=True) - q).max() <= 1e-5
    assert np.abs(ours.encode(TEXTS, is_query=False) - p).max() <= 1e-5


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("model.lora.r=0", "model.lora.r"),
        ("model.lora.alpha=-1", "model.lora.alpha"),
        ("model.lora.dropout=1.0", "model.lora.dropout"),
        ("model.lora.target_modules=[]", "model.lora.target_modules"),
    ],
)
def test_bad_lora_config_names_the_field(override, field):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", [override])
    assert e.value.field == field
