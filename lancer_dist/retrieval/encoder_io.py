"""Encode texts to numpy with a saved encoder, through the training collator (one text rule).

The directory is read by :func:`lancer_dist.model.io.load_encoder_dir` (the one owner of the saved format, beside
:func:`~lancer_dist.model.io.save_encoder`). What this module adds is evaluation's side: an :class:`EncoderSpec` that
a Ray worker can rebuild the encoder from, and :class:`LoadedEncoder`, which tokenises through
:class:`~lancer_dist.data.collate.Collator` and returns float32 arrays. Prefixes (``"query: "`` / ``"passage: "`` for
E5, a rendered instruction for decoder queries) and lengths come from the run's :class:`~lancer_dist.config.ModelConfig`,
or, when the spec carries none, from the prompts saved with the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lancer_dist.config import ModelConfig

__all__ = ["EncoderSpec", "LoadedEncoder", "load_encoder"]


@dataclass(frozen=True)
class EncoderSpec:
    """Everything a (remote) worker needs to rebuild the encoder: the weights' directory and the run's model section
    (small and picklable; a Ray actor receives the spec itself).

    ``model`` supplies the text side: ``query_text_prefix`` / ``passage_prefix``, ``max_query_length`` /
    ``max_passage_length`` and ``trust_remote_code``. ``None``: the prompts saved with the model and
    :class:`ModelConfig`'s default lengths. The weights, architecture, pooling and tokenizer always come from ``path``
    (``model.name_or_path`` / ``model.tokenizer`` are the training run's inputs, not this encoder's).
    """

    path: str
    model: ModelConfig | None = None

    @staticmethod
    def from_model_config(path: str, model_cfg: ModelConfig) -> EncoderSpec:
        """The encoder saved at ``path``, encoding texts as the run ``model_cfg`` trained on them."""
        return EncoderSpec(path=str(path), model=model_cfg)

    def prefixes(self, saved: dict[str, str] | None = None) -> tuple[str, str]:
        """(query prefix, passage prefix): the config's, or the ``saved`` prompts when the spec has no config."""
        if self.model is None:
            saved = saved or {}
            return saved.get("query", ""), saved.get("passage", "")
        return self.model.query_text_prefix, self.model.passage_prefix

    def to_dict(self) -> dict[str, Any]:
        """What an encoding job records in its manifest (a resume with another spec is refused): JSON-able."""
        m = self.model or ModelConfig()
        q, p = self.prefixes() if self.model is not None else (None, None)
        return {
            "path": self.path,
            "query_prefix": q,
            "passage_prefix": p,
            "max_query_length": m.max_query_length,
            "max_passage_length": m.max_passage_length,
            "tokenizer": None,
            "trust_remote_code": m.trust_remote_code,
        }


class LoadedEncoder:
    """A :class:`BiEncoder` in eval mode + its tokenizer; :meth:`encode` returns float32 [N, D] numpy arrays."""

    def __init__(self, model: Any, tokenizer: Any, spec: EncoderSpec, device: str = "cpu"):
        from lancer_dist.data.collate import Collator

        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.device = device
        m = spec.model or ModelConfig()
        query_prefix, passage_prefix = spec.prefixes(model.prompts)
        self.collator = Collator(
            tokenizer,
            query_prefix=query_prefix,
            passage_prefix=passage_prefix,
            max_query_length=m.max_query_length,
            max_passage_length=m.max_passage_length,
        )

    @property
    def dim(self) -> int:
        return int(self.model.embedding_dim)

    def encode(self, texts: list[str], is_query: bool, batch_size: int = 64) -> np.ndarray:
        """Encode ``texts`` (prefix added by the collator) into [N, D] float32, batching texts of similar length
        together."""
        import torch

        tokenize = self.collator.queries if is_query else self.collator.passages
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Length-sorted batches waste far less compute on padding; results are put back in input order.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                idx = order[start : start + batch_size]
                ids_BT, mask_BT = tokenize([texts[i] for i in idx])
                emb_BD = self.model.encode(ids_BT.to(self.device), mask_BT.to(self.device), is_query=is_query)
                out[idx] = emb_BD.float().cpu().numpy()
        return out


def load_encoder(spec: EncoderSpec, device: str | None = None) -> LoadedEncoder:
    """Load the encoder directory ``spec.path`` on ``device`` (default: cuda if any) for encoding."""
    import torch

    from lancer_dist.model.io import load_encoder_dir

    trust = spec.model.trust_remote_code if spec.model is not None else False
    model, tokenizer = load_encoder_dir(spec.path, trust_remote_code=trust)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev).eval()
    return LoadedEncoder(model, tokenizer, spec, dev)
