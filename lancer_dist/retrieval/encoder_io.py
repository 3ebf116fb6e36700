"""Load a saved encoder directory and encode texts to numpy.

A directory written by :meth:`lancer_dist.model.BiEncoder.save_pretrained` carries ``lancer_encoder.json`` (pooling,
normalisation, two towers, query / passage prompts); a plain transformers model directory falls back to mean pooling
+ L2 normalisation (the E5 / Contriever convention). Prefixes (``"query: "`` / ``"passage: "`` for E5, a rendered
instruction for decoder queries) come from the run config, or, when the spec leaves them ``None``, from the prompts
saved with the model. Texts are tokenised by the training :class:`~lancer_dist.data.collate.Collator` (one text rule).
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
    # None: the prompts saved with the model (lancer_encoder.json), else none
    query_prefix: str | None = None
    passage_prefix: str | None = None
    max_query_length: int = 64
    max_passage_length: int = 128
    tokenizer: str | None = None  # default: the model directory (or its query/ tower)
    # run code shipped with the model directory (a hub snapshot of a custom architecture); off unless configured
    trust_remote_code: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_model_config(path: str, model_cfg: Any) -> EncoderSpec:
        """Prefixes and lengths from a :class:`lancer_dist.config.ModelConfig`; weights from ``path``."""
        return EncoderSpec(
            path=str(path),
            query_prefix=model_cfg.query_text_prefix,
            passage_prefix=model_cfg.passage_prefix,
            max_query_length=model_cfg.max_query_length,
            max_passage_length=model_cfg.max_passage_length,
            trust_remote_code=model_cfg.trust_remote_code,
        )


class LoadedEncoder:
    """A :class:`BiEncoder` in eval mode + its tokenizer; :meth:`encode` returns float32 [N, D] numpy arrays."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        spec: EncoderSpec,
        device: str = "cpu",
        prompts: dict[str, str] | None = None,
    ):
        from lancer_dist.data.collate import Collator

        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec
        self.device = device
        saved = prompts or {}
        self.collator = Collator(
            tokenizer,
            query_prefix=spec.query_prefix if spec.query_prefix is not None else saved.get("query", ""),
            passage_prefix=spec.passage_prefix
            if spec.passage_prefix is not None
            else saved.get("passage", ""),
            max_query_length=spec.max_query_length,
            max_passage_length=spec.max_passage_length,
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
    from lancer_dist.model import BiEncoder, prepare_tokenizer

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
        trust_remote_code=spec.trust_remote_code,
        # kept on the model, so that saving it again keeps its prompts
        query_prefix=str((meta.get("prompts") or {}).get("query", "")),
        passage_prefix=str((meta.get("prompts") or {}).get("passage", "")),
    )
    model = BiEncoder.from_config(cfg)
    tok_dir = spec.tokenizer or (str(path / "query") if (path / "query").is_dir() else str(path))
    tokenizer = prepare_tokenizer(
        AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=spec.trust_remote_code), cfg.pooling
    )
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(dev).eval()
    return LoadedEncoder(model, tokenizer, spec, dev, prompts=meta.get("prompts"))
