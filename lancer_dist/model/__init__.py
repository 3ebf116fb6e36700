"""Bi-encoder over any transformers backbone."""

from lancer_dist.model.encoder import BiEncoder, build_backbone, load_tokenizer, pool, prepare_tokenizer

__all__ = ["BiEncoder", "build_backbone", "load_tokenizer", "pool", "prepare_tokenizer"]
