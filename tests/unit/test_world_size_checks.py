"""World-size checks that need no process group: what `lancer train` refuses before training starts, and which
ZeRO checkpoints of another world size the trainer refuses to reshard (the resharding itself runs in
tests/integration/test_world_size.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lancer_dist.config import ConfigError, load_config
from lancer_dist.train.checkpoint import load_zero_resharded
from lancer_dist.train.trainer import check_launch_config

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")  # 4 queries per step, 2 passages x 4 languages


@pytest.mark.parametrize(
    ("world", "overrides", "field"),
    [
        (3, [], "data.retrieval.queries_per_step"),
        (
            4,
            ["data.erasure.passages_per_language=1", "data.erasure.languages=[en,fr]"],
            "passages_per_language",
        ),
    ],
)
def test_launch_check_names_the_field_that_does_not_split(
    monkeypatch: pytest.MonkeyPatch, world: int, overrides: list[str], field: str
) -> None:
    cfg = load_config(TINY, overrides)
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError, match=field):
        check_launch_config(cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_launch_config(load_config(TINY, []))  # 4 queries, 8 passages: 2 ranks are fine


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        (["train.strategy=deepspeed", "train.zero_stage=3"], "ZeRO-3 parameter shards"),
        (
            [
                "train.strategy=deepspeed",
                "train.deepspeed_config=ELASTIC",
            ],
            "elastic_checkpoint",
        ),
    ],
)
def test_zero_checkpoints_that_cannot_be_resharded_are_refused(
    tmp_path: Path, overrides: list[str], why: str
) -> None:
    # a user's ZeRO-2 JSON with DeepSpeed's elastic (list) optimizer state, which ds_to_universal cannot read
    elastic = tmp_path / "elastic.json"
    elastic.write_text('{"zero_optimization": {"stage": 2, "elastic_checkpoint": true}}')
    overrides = [o.replace("ELASTIC", str(elastic)) for o in overrides]
    cfg = load_config(
        TINY, [*overrides, "data.retrieval.queries_per_step=6", "data.erasure.passages_per_language=3"]
    )
    with pytest.raises(ConfigError, match=rf"train\.checkpoint\.resume.*same world size \(2, now 3\).*{why}"):
        load_zero_resharded(None, cfg, tmp_path, 2, rank=0, world=3)
