"""Backbone options (issue #11): ``model.attn_implementation``, ``model.torch_dtype``, ``model.gradient_checkpointing``.

Each option is checked on the backbone it produced (its config, its parameters' dtype, the layers actually being
recomputed in the backward pass), for a random backbone (``backbone_config``) and for one loaded from a saved
directory (``name_or_path``, the ``from_pretrained`` path), so that an option dropped on the way fails a test."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from lancer_dist.config import ConfigError, LoraConfig, ModelConfig, load_config
from lancer_dist.data.collate import Collator
from lancer_dist.model import BiEncoder, prepare_tokenizer
from tests.unit.test_backbones import TEXTS, _backbone_config, _tokenizer_for

POOLING = {"bert": "mean", "qwen2": "last_token"}


def _cfg(model_type: str, vocab: int, **kw) -> ModelConfig:
    return ModelConfig(
        backbone_config=_backbone_config(model_type, vocab),
        tokenizer="unused",
        pooling=POOLING[model_type],  # type: ignore[arg-type]
        dropout=0.0,
        **kw,
    )


def _batch(model_type: str):
    tok = prepare_tokenizer(_tokenizer_for(model_type), POOLING[model_type])
    return len(tok), Collator(tok).passages(TEXTS)


def _saved(tmp_path: Path, model_type: str, vocab: int) -> Path:
    torch.manual_seed(0)
    return BiEncoder.from_config(_cfg(model_type, vocab)).save_pretrained(tmp_path / model_type)


def _from_dir(d: Path, model_type: str, **kw) -> BiEncoder:
    return BiEncoder.from_config(
        ModelConfig(name_or_path=str(d), pooling=POOLING[model_type], dropout=0.0, **kw)
    )


# ---- attn_implementation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["bert", "qwen2"])
def test_attn_implementation_reaches_the_backbone_and_both_kernels_agree(tmp_path, model_type):
    vocab, (ids, mask) = _batch(model_type)
    saved = _saved(tmp_path, model_type, vocab)
    embs = {}
    for attn in ("sdpa", "eager"):
        for source in ("random", "saved"):
            if source == "random":
                torch.manual_seed(0)
                model = BiEncoder.from_config(_cfg(model_type, vocab, attn_implementation=attn))
            else:
                model = _from_dir(saved, model_type, attn_implementation=attn)
            assert model.query_backbone.config._attn_implementation == attn, (attn, source)
            with torch.no_grad():
                embs[attn, source] = model.eval().encode(ids, mask)
    # two real attention kernels computing the same function, padding masked in both. In float32: after
    # ``.double()`` eager attention gives NaN on a left-padded causal decoder (a padding row with every key
    # masked), which sdpa does not.
    for source in ("random", "saved"):
        torch.testing.assert_close(embs["sdpa", source], embs["eager", source], atol=1e-5, rtol=0)


def test_default_attention_is_sdpa():
    vocab, _ = _batch("bert")
    assert BiEncoder.from_config(_cfg("bert", vocab)).query_backbone.config._attn_implementation == "sdpa"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed here")
def test_flash_attention_without_the_package_is_a_config_error_naming_the_field():
    vocab, _ = _batch("qwen2")
    with pytest.raises(ConfigError, match=r"model\.attn_implementation.*flash_attn"):
        BiEncoder.from_config(_cfg("qwen2", vocab, attn_implementation="flash_attention_2"))


def test_unknown_attn_implementation_and_dtype_are_config_errors(tmp_path):
    (tmp_path / "run.yaml").write_text("model: {name_or_path: x}\n")
    with pytest.raises(ConfigError, match=r"model\.attn_implementation"):
        load_config(tmp_path / "run.yaml", ["model.attn_implementation=flash"])
    with pytest.raises(ConfigError, match=r"model\.torch_dtype"):
        load_config(tmp_path / "run.yaml", ["model.torch_dtype=float64"])
    # fp64 verification runs cast float32 weights to float64: other weight dtypes are refused
    with pytest.raises(ConfigError, match=r"model\.torch_dtype"):
        load_config(tmp_path / "run.yaml", ["model.torch_dtype=bfloat16", "train.precision=fp64"])


# ---- torch_dtype ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
@pytest.mark.parametrize("model_type", ["bert", "qwen2"])
def test_torch_dtype_is_the_dtype_of_every_backbone_weight(tmp_path, model_type, dtype):
    vocab, (ids, mask) = _batch(model_type)
    saved = _saved(tmp_path, model_type, vocab)
    want = getattr(torch, dtype)
    torch.manual_seed(0)
    for model in (
        BiEncoder.from_config(_cfg(model_type, vocab, torch_dtype=dtype)),
        _from_dir(saved, model_type, torch_dtype=dtype),
    ):
        assert {p.dtype for p in model.parameters()} == {want}
        with torch.no_grad():
            assert model.eval().encode(ids, mask).dtype == want
    # the loaded weights are the saved ones, rounded to the dtype (not re-initialised)
    ref = _from_dir(saved, model_type)
    low = _from_dir(saved, model_type, torch_dtype=dtype)
    for (n, a), (_, b) in zip(ref.named_parameters(), low.named_parameters(), strict=True):
        assert torch.equal(a.to(want), b), n


def test_torch_dtype_with_lora_keeps_the_frozen_base_in_that_dtype():
    vocab, (ids, mask) = _batch("qwen2")
    cfg = _cfg("qwen2", vocab, torch_dtype="bfloat16", lora=LoraConfig(enabled=True, r=4, alpha=8))
    model = BiEncoder.from_config(cfg)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16}
    model.train()
    model.encode(ids, mask).float().pow(2).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---- gradient_checkpointing -------------------------------------------------------------------------------------


def _layer_calls(model: BiEncoder, ids, mask) -> int:
    """How many times the backbone's transformer layers run in one training forward + backward: once per layer
    without checkpointing, twice with it (the backward pass recomputes each checkpointed layer)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    calls = [0]
    layers = [m for m in model.query_backbone.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers
    # transformers checkpoints a layer's forward (module hooks stay outside the checkpoint), and non-reentrant
    # checkpointing stops a recomputation as soon as it has the tensors it needs: count the starts of each
    # layer's first sub-module (its attention), which the recomputation does run
    firsts = [next(iter(m.children())) for m in layers]
    hooks = [m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for m in firsts]
    model.train()
    model.encode(ids, mask).pow(2).sum().backward()
    for h in hooks:
        h.remove()
    model.zero_grad()
    return calls[0] // len(layers)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("model_type", ["bert", "qwen2"])
def test_gradient_checkpointing_recomputes_layers_and_gives_the_same_gradients(model_type, lora):
    vocab, (ids, mask) = _batch(model_type)
    lora_cfg = LoraConfig(enabled=lora, r=4, alpha=8)
    torch.manual_seed(0)
    plain = BiEncoder.from_config(_cfg(model_type, vocab, lora=lora_cfg)).double()
    torch.manual_seed(0)
    ckpt = BiEncoder.from_config(_cfg(model_type, vocab, lora=lora_cfg, gradient_checkpointing=True)).double()
    with torch.no_grad():  # lora_B starts at zero: give it values so the adapters' gradients are not trivial
        for a, b in zip(plain.parameters(), ckpt.parameters(), strict=True):
            a.add_(0.05 * torch.randn_like(a))
            b.copy_(a)

    assert ckpt.query_backbone.is_activation_checkpointing  # PEFT forwards the attribute to the base model
    assert not plain.query_backbone.is_activation_checkpointing
    funcs = {
        m._gradient_checkpointing_func.keywords.get("use_reentrant")
        for m in ckpt.query_backbone.modules()
        if getattr(m, "_gradient_checkpointing_func", None) is not None
    }
    assert funcs == {False}
    assert _layer_calls(plain, ids, mask) == 1
    assert _layer_calls(ckpt, ids, mask) == 2

    grads = []
    for model in (plain, ckpt):
        model.train()
        model.zero_grad()
        model.encode(ids, mask).pow(2).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0].values() if g is not None)
    for n, g in grads[0].items():
        assert g is not None, n
        torch.testing.assert_close(grads[1][n], g, atol=1e-10, rtol=0, msg=n)
