"""LoRA adapters through PEFT, and their merge into plain weights for the saved final model.

``apply_lora`` wraps a backbone in a ``peft.PeftModel``: the base weights are frozen, only ``lora_A`` / ``lora_B``
train. ``merge_lora_state_dict`` folds the adapters into the base weights from a state dict alone
(``W + alpha / r * B @ A``), without building a model: the trainer saves from the full state dict it gathered
(ZeRO-3 shards included), where a second model could not be built on rank 0 alone.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lancer_dist.config import LoraConfig

__all__ = ["apply_lora", "is_lora", "merge_lora_state_dict"]

_ADAPTER = "default"
_PEFT_PREFIX = "base_model.model."


def apply_lora(backbone: Any, cfg: LoraConfig) -> Any:
    """``backbone`` wrapped with LoRA adapters (rank ``r``, scale ``alpha / r``, dropout, target modules)."""
    import peft

    lora = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules) if cfg.target_modules is not None else None,
        bias="none",
    )
    return peft.get_peft_model(backbone, lora)


def is_lora(backbone: Any) -> bool:
    return hasattr(backbone, "peft_config")


def lora_scaling(backbone: Any) -> float:
    conf = backbone.peft_config[_ADAPTER]
    if getattr(conf, "use_rslora", False) or getattr(conf, "use_dora", False):
        raise ValueError("only plain LoRA (no rsLoRA / DoRA) is merged by lancer")
    return float(conf.lora_alpha) / float(conf.r)


def merge_lora_state_dict(sd: dict[str, Tensor], scaling: float) -> dict[str, Tensor]:
    """A PEFT model's state dict -> the base architecture's state dict with the adapters merged.

    ``x.base_layer.weight`` [out, in] + ``scaling * x.lora_B.default.weight [out, r] @ x.lora_A.default.weight [r, in]``
    becomes ``x.weight``; ``x.base_layer.bias`` becomes ``x.bias``; the ``base_model.model.`` prefix is dropped."""
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        name = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        if ".lora_" in name:
            continue
        if name.endswith(".base_layer.weight"):
            stem = name[: -len(".base_layer.weight")]
            a_key, b_key = (f"{_PEFT_PREFIX}{stem}.lora_{x}.{_ADAPTER}.weight" for x in "AB")
            if a_key not in sd or b_key not in sd:
                raise ValueError(
                    f"cannot merge {key}: only LoRA on linear layers is supported ({a_key} missing)"
                )
            a_RI, b_OR = sd[a_key], sd[b_key]
            merged = value + scaling * (b_OR.to(value.dtype) @ a_RI.to(value.dtype))
            out[f"{stem}.weight"] = merged
        elif name.endswith(".base_layer.bias"):
            out[name[: -len(".base_layer.bias")] + ".bias"] = value
        else:
            out[name] = value
    return out
