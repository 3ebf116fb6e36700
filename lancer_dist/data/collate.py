"""Tokenisation and collation: texts -> padded ``input_ids`` / ``attention_mask`` tensors.

Queries and passages get the model's prefixes (``query: `` / ``passage: `` for E5; a rendered instruction before
queries for decoder embedders) and are truncated to the model's max lengths (special tokens included); each batch is
padded to its own longest sequence, on the tokenizer's padding side. Titles are joined to passages by
:func:`lancer_dist.data.text.passage_text` (re-exported here). This is the one text rule: training batches and
evaluation encoding (:mod:`lancer_dist.retrieval.encoder_io`) both go through :class:`Collator`, with a tokenizer set
up by :func:`lancer_dist.model.encoder.prepare_tokenizer` (pad token, left padding and EOS for last-token pooling).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lancer_dist.config import ModelConfig
from lancer_dist.data.text import passage_text

__all__ = ["Collator", "passage_text"]


class Collator:
    """Tokenises with any Hugging Face (fast) tokenizer; returns ``(input_ids [N, T], attention_mask [N, T])``."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        query_prefix: str = "",
        passage_prefix: str = "",
        max_query_length: int = 64,
        max_passage_length: int = 128,
    ) -> None:
        self.tokenizer = tokenizer
        self.query_prefix = query_prefix
        self.passage_prefix = passage_prefix
        self.max_query_length = max_query_length
        self.max_passage_length = max_passage_length

    @classmethod
    def from_config(cls, cfg: ModelConfig, tokenizer: Any) -> Collator:
        return cls(
            tokenizer,
            query_prefix=cfg.query_text_prefix,
            passage_prefix=cfg.passage_prefix,
            max_query_length=cfg.max_query_length,
            max_passage_length=cfg.max_passage_length,
        )

    def _backend(self, max_length: int) -> Any:
        """A fast tokenizer's Rust backend with truncation and padding set for this call, or None.

        Calling it directly skips most of the per-batch time transformers spends converting its output; the ids
        are the same (checked against ``tokenizer(...)`` in the tests). Setting truncation/padding on the backend
        is what transformers itself does before each call, so the tokenizer is left in a state it handles."""
        tok = self.tokenizer
        if not getattr(tok, "is_fast", False) or tok.pad_token_id is None:
            return None
        b = tok.backend_tokenizer
        b.enable_truncation(max_length, direction=getattr(tok, "truncation_side", "right"))
        b.enable_padding(
            direction=getattr(tok, "padding_side", "right"), pad_id=tok.pad_token_id, pad_token=tok.pad_token
        )
        return b

    def _encode(self, texts: Sequence[str], prefix: str, max_length: int) -> tuple[Tensor, Tensor]:
        if not texts:
            empty = torch.zeros(0, 0, dtype=torch.long)
            return empty, empty.clone()
        backend = self._backend(max_length)
        if backend is not None:
            encs = backend.encode_batch([prefix + t for t in texts])
            ids = torch.from_numpy(np.array([e.ids for e in encs], dtype=np.int64))
            mask = torch.from_numpy(np.array([e.attention_mask for e in encs], dtype=np.int64))
            return ids, mask
        enc = self.tokenizer(
            [prefix + t for t in texts],
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
            return_token_type_ids=False,
        )
        return enc["input_ids"].long(), enc["attention_mask"].long()

    def queries(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``[B, Tq]`` ids and mask for query texts."""
        return self._encode(texts, self.query_prefix, self.max_query_length)

    def passages(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``[N, Tp]`` ids and mask for passage texts."""
        return self._encode(texts, self.passage_prefix, self.max_passage_length)
