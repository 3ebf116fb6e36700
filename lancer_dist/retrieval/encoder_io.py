"""Load a saved encoder directory and encode texts to numpy.

A directory written by :meth:`lancer_dist.model.BiEncoder.save_pretrained` carries ``lancer_encoder.json`` (pooling,
normalisation, two towers); a plain transformers model directory falls back to mean pooling + L2 normalisation
(the E5 / Contriever convention). Prefixes (``"query: "`` / ``"passage: "`` for E5) come from the run config.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["EncoderSpec", "LoadedEncoder", "load_encoder"]


@dataclass(frozen=True)
class EncoderSpec:
    """Everything a (remote) worker needs to rebuild the encoder: small, picklable, JSON-able."""

    path: str
    query_prefix: str = ""
    passage_prefix: str = ""
    max_query_length: int = 64
    max_passage_length: int = 128
    tokenizer: str | None = None  # default: the model directory (or its query/ tower)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_model_config(path: str, model_cfg: Any) -> EncoderSpec:
        """Prefixes and lengths from a :class:`lancer_dist.config.ModelConfig`; weights from ``path``."""
        return EncoderSpec(
            path=str(path),
            query_prefix=model_cfg.query_prefix,
            passage_prefix=model_cfg.passage_prefix,
            max_query_length=model_cfg.max_query_length,
            max_passage_length=model_cfg.max_passage_length,
        )


class LoadedEncoder:
    """A :class:`BiEncoder` in eval mode + its tokenizer; :meth:`encode` returns float32 [N, D] numpy arrays."""

    def __init__(self, model: Any, tokenizer: Any, spec: EncoderSpec, device: str = "cpu"):
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.device = device

    @property
    def dim(self) -> int:
        return int(self.model.embedding_dim)

    def encode(self, texts: list[str], is_query: bool, batch_size: int = 64) -> np.ndarray:
        """Encode ``texts`` (prefix added here) into [N, D] float32, batching texts of similar length together."""
        import torch

        prefix = self.spec.query_prefix if is_query else self.spec.passage_prefix
        max_len = self.spec.max_query_length if is_query else self.spec.max_passage_length
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        # Length-sorted batches waste far less compute on padding; results are put back in input order.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                idx = order[start : start + batch_size]
                batch = self.tokenizer(
                    [prefix + texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=max_len,
                    return_tensors="pt",
                )
                emb_BD = self.model.encode(
                    batch["input_ids"].to(self.device),
                    batch["attention_mask"].to(self.device),
                    is_query=is_query,
                )
                out[idx] = emb_BD.float().cpu().numpy()
        return out


def _read_meta(path: Path) -> dict[str, Any]:
    from lancer_dist.model.encoder import ENCODER_META

    meta_file = path / ENCODER_META
    if meta_file.is_file():
        try:
            return dict(json.loads(meta_file.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{meta_file}: not valid JSON ({e})") from e
    # A plain transformers directory: mean pooling + normalisation (E5, Contriever).
    return {"pooling": "mean", "normalize": True, "temperature": 1.0, "shared_towers": True}


def load_encoder(spec: EncoderSpec, device: str | None = None) -> LoadedEncoder:
    """Load the encoder directory ``spec.path`` (see the module docstring) on ``device`` (default: cuda if any)."""
    import torch
    from transformers import AutoTokenizer

    from lancer_dist.config import ModelConfig
    from lancer_dist.model import BiEncoder

    path = Path(spec.path)
    if not path.is_dir():
        raise FileNotFoundError(f"encoder directory {path} does not exist")
    meta = _read_meta(path)
    cfg = ModelConfig(
        name_or_path=str(path),
        pooling=meta.get("pooling", "mean"),
        normalize=bool(meta.get("normalize", True)),
        temperature=float(meta.get("temperature", 1.0)),
        shared_towers=bool(meta.get("shared_towers", True)),
        dropout=0.0,
    )
    model = BiEncoder.from_config(cfg)
    tok_dir = spec.tokenizer or (str(path / "query") if (path / "query").is_dir() else str(path))
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev).eval()
    return LoadedEncoder(model, tokenizer, spec, dev)
