"""Tiny real components for tests, smoke runs and benchmarks: a word-level tokenizer fitted on given texts, a
randomly initialised small BERT bi-encoder saved like any trained one. (A BEIR collection from dicts:
``lancer_dist.retrieval.collections.Collection(corpus, queries, qrels).write_beir(dir)``.)"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["word_tokenizer", "write_tiny_encoder"]

BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def word_tokenizer(
    words: Iterable[str],
    *,
    specials: Iterable[str] = BERT_SPECIALS,
    lowercase: bool = False,
    max_length: int | None = None,
) -> Any:
    """A BERT-style fast tokenizer over a fixed word list: ids are ``specials`` then ``words`` in order, text splits
    on whitespace, unknown words map to ``[UNK]``, and every sequence is ``[CLS] ... [SEP]``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = list(specials)
    vocab = {w: i for i, w in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    named = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]"}
    if "[MASK]" in vocab:
        named["mask_token"] = "[MASK]"
    extra = {} if max_length is None else {"model_max_length": max_length}
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named, **extra)


def write_tiny_encoder(
    out_dir: str | Path,
    texts: Iterable[str],
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    max_length: int = 64,
    seed: int = 0,
    pooling: str = "mean",
    normalize: bool = True,
) -> Path:
    """A random BERT (``hidden_size``, ``num_layers``) + a whitespace word-level tokenizer over ``texts``, saved with
    :meth:`BiEncoder.save_pretrained` to ``out_dir``. Deterministic for a given seed and texts."""
    import torch

    from lancer_dist.config import ModelConfig
    from lancer_dist.model import BiEncoder

    words = sorted({w for t in texts for w in t.lower().split()} | {"query:", "passage:"})
    tokenizer = word_tokenizer(words, lowercase=True, max_length=max_length)
    cfg = ModelConfig(
        backbone_config={
            "model_type": "bert",
            "vocab_size": len(tokenizer),
            "hidden_size": hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": 2,
            "intermediate_size": 2 * hidden_size,
            "max_position_embeddings": max(max_length, 16),
        },
        tokenizer="unused",
        pooling=pooling,  # type: ignore[arg-type]
        normalize=normalize,
        dropout=0.0,
    )
    torch.manual_seed(seed)
    model = BiEncoder.from_config(cfg)
    return model.save_pretrained(out_dir, tokenizer)
