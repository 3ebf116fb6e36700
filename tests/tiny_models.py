"""Tiny random-init models and token batches shared by the tests (no hub, no files)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lancer_dist.config import ModelConfig

VOCAB = 97
# A small fixed vocabulary for word-level tokenizers (lancer_dist.retrieval.tiny.write_tiny_encoder).
GREEK = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
]


def tiny_bert_config(
    dropout: float = 0.0,
    *,
    vocab_size: int = VOCAB,
    hidden_size: int = 16,
    max_length: int = 32,
    **fields: Any,
) -> ModelConfig:
    """A 2-layer BERT bi-encoder config (default 16-dim over ``VOCAB`` token ids; mean pooling, normalised)."""
    return ModelConfig(
        backbone_config={
            "model_type": "bert",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 2 * hidden_size,
            "max_position_embeddings": max_length,
        },
        tokenizer="unused",
        pooling="mean",
        normalize=True,
        temperature=0.2,
        dropout=dropout,
        **fields,
    )


def token_batch(n: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` random id rows of random lengths in [2, length] (right-padded with 0) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n, length), generator=g)
    lengths = torch.randint(2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


# ---- one tiny random-init model per backbone family of issue #11 (the family matrix) -----------------------------

_ENCODER = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32}
_DECODER = {**_ENCODER, "num_key_value_heads": 1}
INSTRUCTION = "Given a verse, retrieve related verses"


def family_models(vocab_size: int, max_positions: int = 64) -> dict[str, dict[str, Any]]:
    """``model:`` sections (no tokenizer) of a tiny random-init backbone per family, each built from a config of that
    architecture (hidden 16, 2 layers) with the family's pooling, normalisation and text rule: mBERT/mDPR (BERT, CLS,
    unnormalised), XLM-R (CLS), mE5 (XLM-R architecture, mean, E5 prefixes), LaBSE (BERT, pooler = dense + tanh,
    normalised), bge-m3 (XLM-R, CLS, normalised); decoders with last-token pooling, left padding, EOS appended and an
    instruction on queries: Qwen2, Qwen3 (gradient checkpointing), Llama, Mistral (LoRA on q/v/up, gradient
    checkpointing, as configs/e5-mistral-7b-lora.yaml)."""

    # Encoders get initializer_range 0.2 (BERT's default: 0.02): at 0.02 a random CLS / pooler state barely varies
    # between texts (variance / second moment ~1e-7 per dimension), and the erasure loss's variance from summed
    # moments, sum x^2 - (sum x)^2 / N, then loses ~7 digits to cancellation, so a different summation order (2 ranks
    # vs 1 process) moves it by ~1e-10 in float64. At 0.2 the ratio is ~1e-3 and the comparison holds to ~1e-14.
    enc = {**_ENCODER, "initializer_range": 0.2}

    def bert(**kw: Any) -> dict[str, Any]:
        return {
            "model_type": "bert",
            "vocab_size": vocab_size,
            "max_position_embeddings": max_positions,
            **enc,
            **kw,
        }

    def xlmr(**kw: Any) -> dict[str, Any]:
        # XLM-R numbers positions from pad_token_id + 1: two more position rows than the longest text
        return {
            "model_type": "xlm-roberta",
            "vocab_size": vocab_size,
            "max_position_embeddings": max_positions + 2,
            "pad_token_id": 1,
            **enc,
            **kw,
        }

    def decoder(model_type: str, **kw: Any) -> dict[str, Any]:
        return {
            "model_type": model_type,
            "vocab_size": vocab_size,
            "max_position_embeddings": max_positions,
            **_DECODER,
            **kw,
        }

    no_prefix = {"query_prefix": "", "passage_prefix": ""}
    e5 = {"query_prefix": "query: ", "passage_prefix": "passage: "}
    last = {"pooling": "last_token", "normalize": True, "query_instruction": INSTRUCTION, **no_prefix}
    return {
        "mbert": {"backbone_config": bert(), "pooling": "cls", "normalize": False, **no_prefix},
        "xlmr": {"backbone_config": xlmr(), "pooling": "cls", "normalize": False, **no_prefix},
        "me5": {"backbone_config": xlmr(), "pooling": "mean", "normalize": True, **e5},
        "labse": {"backbone_config": bert(), "pooling": "pooler", "normalize": True, **no_prefix},
        "bge-m3": {"backbone_config": xlmr(), "pooling": "cls", "normalize": True, **no_prefix},
        "qwen2": {"backbone_config": decoder("qwen2"), **last},
        "qwen3": {"backbone_config": decoder("qwen3", head_dim=8), "gradient_checkpointing": True, **last},
        "llama": {"backbone_config": decoder("llama"), **last},
        "mistral": {
            "backbone_config": decoder("mistral"),
            "lora": {"enabled": True, "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]},
            "gradient_checkpointing": True,
            **last,
        },
    }


def save_family_models(root: Path, vocab_size: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """:func:`family_models` with each random-init backbone saved (``save_pretrained``) under ``root/<family>`` and
    named by ``name_or_path``: every strategy then starts from the same weights (DeepSpeed ZeRO-3 builds a
    ``backbone_config`` model under ``zero.Init``, which initialises it with other random draws than a plain
    process does)."""
    from transformers import AutoConfig, AutoModel

    out = {}
    for name, model in family_models(vocab_size).items():
        conf = dict(model["backbone_config"])
        torch.manual_seed(seed)
        d = root / name
        AutoModel.from_config(AutoConfig.for_model(conf.pop("model_type"), **conf)).save_pretrained(d)
        out[name] = {**{k: v for k, v in model.items() if k != "backbone_config"}, "name_or_path": str(d)}
    return out
