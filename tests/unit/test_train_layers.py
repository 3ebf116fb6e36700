"""``model.train_layers: k`` (lancer_dist/model/freeze.py): only the top k transformer layers (and the final norm /
pooler above them) train.

Checked on tiny random BERT (encoder; with its pooler) and Qwen2 (decoder; final norm) bi-encoders of 4 layers:
which parameters require grad (by name, against the layer indices), that autograd stops below the first trainable
layer (the hidden states entering it do not require grad), that one AdamW step leaves every frozen parameter bit for
bit as it was and moves every trainable one (also with gradient checkpointing), that the trainable parameters' gradients equal those of the same model
with nothing frozen (float64, 1e-12: freezing the bottom changes no gradient above it), LoRA and two towers, and
that a bad k is a ConfigError naming the field."""

from __future__ import annotations

import re

import pytest
import torch

from lancer_dist.config import ConfigError, LoraConfig, ModelConfig, load_config
from lancer_dist.model import BiEncoder
from lancer_dist.model.freeze import layer_stack
from tests.tiny_models import VOCAB, token_batch

LAYERS = 4
# pooling that uses what the backbone has above its layer stack: BERT's pooler, Qwen2's final norm (always used)
POOLING = {"bert": "pooler", "qwen2": "last_token"}
ABOVE = {"bert": r"pooler\.", "qwen2": r"norm\."}  # trains with the top layers
LAYER = {"bert": r"encoder\.layer\.(\d+)\.", "qwen2": r"layers\.(\d+)\."}


def _cfg(model_type: str, **kw) -> ModelConfig:
    bc = {
        "model_type": model_type,
        "vocab_size": VOCAB,
        "hidden_size": 16,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 64,
    }
    if model_type == "qwen2":
        bc["num_key_value_heads"] = 1
    return ModelConfig(
        backbone_config=bc, tokenizer="unused", pooling=POOLING[model_type], normalize=True, dropout=0.0, **kw
    )


def _model(model_type: str, **kw) -> BiEncoder:
    torch.manual_seed(0)
    return BiEncoder.from_config(_cfg(model_type, **kw)).double()


def _expected_trainable(name: str, model_type: str, k: int) -> bool:
    m = re.search(LAYER[model_type], name)
    if m:
        return int(m.group(1)) >= LAYERS - k
    return re.search(ABOVE[model_type], name) is not None  # embeddings: frozen


def _loss(model: BiEncoder) -> torch.Tensor:
    ids, mask = token_batch(6, 8, seed=1)
    q, p, x = model(ids[:2], mask[:2], ids[2:], mask[2:], ids, mask)
    assert q is not None and p is not None and x is not None
    return (q @ p.T).logsumexp(-1).sum() + x.pow(3).sum()


@pytest.mark.parametrize("model_type", ["bert", "qwen2"])
@pytest.mark.parametrize("k", [1, 2, LAYERS])
def test_only_the_top_k_layers_and_what_follows_them_require_grad(model_type, k):
    model = _model(model_type, train_layers=k)
    names = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(
        re.search(ABOVE[model_type], n) for n in names
    )  # the model has what must train above the layers
    for n, req in names.items():
        assert req == _expected_trainable(n, model_type, k), n
    # every top layer has trainable parameters; the embeddings never do
    assert {int(m.group(1)) for n, r in names.items() if r and (m := re.search(LAYER[model_type], n))} == set(
        range(LAYERS - k, LAYERS)
    )
    assert not any(r for n, r in names.items() if "embed" in n)


@pytest.mark.parametrize("model_type", ["bert", "qwen2"])
def test_autograd_stops_below_the_first_trainable_layer(model_type):
    k = 2
    model = _model(model_type, train_layers=k)
    layers = layer_stack(model.query_backbone)
    seen: dict[int, bool] = {}

    def hook(i):
        def f(_mod, args, kwargs, out):
            h = args[0] if args else kwargs["hidden_states"]
            seen[i] = h.requires_grad  # the hidden states entering layer i
            return None

        return f

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        _loss(model).backward()
    finally:
        for h in handles:
            h.remove()
    # the first trainable layer (LAYERS - k) gets inputs without grad: nothing below it is in the graph
    assert seen == {i: i > LAYERS - k for i in range(LAYERS)}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("model_type", ["bert", "qwen2"])
def test_a_step_leaves_frozen_parameters_bit_identical_and_gradients_match_the_unfrozen_model(
    model_type, checkpointing
):
    k = 2
    model = _model(model_type, train_layers=k, gradient_checkpointing=checkpointing)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    _loss(model).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(grads) == trainable
    for n, p in model.named_parameters():
        if n in trainable:
            assert not torch.equal(p.detach(), before[n]), f"{n} did not move"
        else:
            assert torch.equal(p.detach(), before[n]), f"frozen {n} changed"
    # reference: the same weights with nothing frozen; the top layers' gradients do not depend on the freezing
    ref = _model(model_type)
    _loss(ref).backward()
    for n, p in ref.named_parameters():
        if n in grads:
            assert torch.allclose(grads[n], p.grad, rtol=0, atol=1e-12), n


def test_lora_composes_only_the_top_layers_adapters_train():
    lora = LoraConfig(enabled=True, r=2, alpha=4, target_modules=["query", "value"])
    model = _model("bert", train_layers=1, lora=lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    adapters = [n for n, _ in model.named_parameters() if ".lora_" in n]
    assert trainable and len(adapters) == 4 * LAYERS  # A and B of query and value in every layer
    assert trainable == [n for n in adapters if f"layer.{LAYERS - 1}." in n]


def test_two_towers_and_freeze_embeddings_compose():
    model = _model("bert", train_layers=1, shared_towers=False, freeze_embeddings=True)
    for bb in model.backbones():
        req = {n for n, p in bb.named_parameters() if p.requires_grad}
        assert req and all(n.startswith((f"encoder.layer.{LAYERS - 1}.", "pooler.")) for n in req)


@pytest.mark.parametrize("value", [0, -1, LAYERS + 1])
def test_bad_k_in_the_config_names_the_field(value):
    with pytest.raises(ConfigError, match=r"model\.train_layers.*got " + str(value)):
        load_config(
            None,
            [
                f"model.backbone_config={{model_type: bert, num_hidden_layers: {LAYERS}}}",
                "model.tokenizer=unused",
                f"model.train_layers={value}",
            ],
        )


def test_k_above_a_pretrained_backbones_layers_is_refused_when_built(tmp_path):
    saved = BiEncoder.from_config(_cfg("bert")).save_pretrained(tmp_path / "m")
    BiEncoder.from_config(ModelConfig(name_or_path=str(saved), pooling="mean", train_layers=LAYERS))
    with pytest.raises(
        ConfigError, match=rf"model\.train_layers.*got {LAYERS + 1}.*this backbone has {LAYERS}"
    ):
        BiEncoder.from_config(ModelConfig(name_or_path=str(saved), pooling="mean", train_layers=LAYERS + 1))
