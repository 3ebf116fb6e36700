from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lancer_dist.config import ConfigError, RunConfig, config_to_dict, load_config

REPO = Path(__file__).resolve().parents[2]


def test_every_shipped_config_loads():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, RunConfig)


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        REPO / "configs/tiny.yaml", ["train.lr=3e-4", "model.pooling=cls", "data.erasure.languages=[en,fr]"]
    )
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.pooling == "cls"
    assert cfg.data.erasure.languages == ["en", "fr"]


@pytest.mark.parametrize(
    ("override", "field", "expected"),
    [
        ("train.lr=-1", "train.lr", "learning rate > 0"),
        ("model.pooling=max", "model.pooling", "one of 'cls', 'mean', 'pooler'"),
        ("train.steps=ten", "train.steps", "an integer"),
        ("train.zero_stage=5", "train.zero_stage", "one of 0, 1, 2, 3"),
        ("model.normalize=maybe", "model.normalize", "true/false"),
        ("train.lrr=1", "train.lrr", "a known field of TrainConfig"),
        ("model.temperature=0", "model.temperature", "> 0"),
        ("loss.erasure_form=cubic", "loss.erasure_form", "one of 'abs', 'squared', 'debiased'"),
        ("probe.cv_folds=1", "probe.cv_folds", "an integer >= 2"),
    ],
)
def test_bad_values_name_field_value_and_expectation(override, field, expected):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs/tiny.yaml", [override])
    assert e.value.field == field
    msg = str(e.value)
    assert field in msg and expected in msg and "tiny.yaml" in msg
    assert repr(e.value.value) in msg


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(REPO / "configs/tiny.yaml")
    f = tmp_path / "resolved.yaml"
    f.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(f) == cfg


def test_unset_env_var_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    f = tmp_path / "c.yaml"
    f.write_text("output_dir: ${NOPE_NOT_SET}/x\n")
    with pytest.raises(ConfigError, match="NOPE_NOT_SET"):
        load_config(f)


def test_cli_config_show(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lancer_dist.cli",
            "config",
            "show",
            "--config",
            str(REPO / "configs/tiny.yaml"),
            "train.steps=7",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert yaml.safe_load(out.stdout)["train"]["steps"] == 7
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "lancer_dist.cli",
            "config",
            "show",
            "--config",
            str(REPO / "configs/tiny.yaml"),
            "train.warmup_steps=99",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "train.warmup_steps" in bad.stderr and "99" in bad.stderr


@pytest.mark.parametrize(
    ("override", "field", "expected"),
    [
        ("eval.index.kind=ivf", "eval.index.kind", "one of"),
        ("eval.index.nlist=0", "eval.index.nlist", ">= 1"),
        ("eval.index.nprobe=2000", "eval.index.nprobe", "<= nlist"),
        ("eval.index.pq_nbits=17", "eval.index.pq_nbits", "1..16"),
        ("eval.index.ef_search=0", "eval.index.ef_search", ">= 1"),
        ("eval.index.recall_queries=-1", "eval.index.recall_queries", ">= 0"),
        ("eval.index.refine_factor=-1", "eval.index.refine_factor", ">= 0"),
        ("eval.search_kernel=gemm", "eval.search_kernel", "torch"),
        ("eval.search_parallel=mpi", "eval.search_parallel", "one of"),
        ("eval.search_block=0", "eval.search_block", ">= 1"),
    ],
)
def test_index_config_errors_name_the_field(override, field, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert field in str(e.value) and expected in str(e.value)


def test_index_config_and_factory_are_exclusive():
    with pytest.raises(ConfigError, match=r"eval\.index_factory"):
        load_config(None, ["eval.index.kind=hnsw", "eval.index_factory=IVF16,Flat"])
    cfg = load_config(None, ["eval.index.kind=ivf_pq", "eval.index.nlist=256", "eval.index.pq_m=16"])
    assert cfg.eval.index_spec().factory(384) == "IVF256,PQ16x8"
    assert load_config(None, ["eval.index_factory=HNSW32"]).eval.index_spec() == "HNSW32"


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["loss.erasure_chunk=-1"], "an integer >= 0"),
        (["loss.erasure_chunk=4", "train.grad_cache_chunk_size=2"], "gradient caching already encodes"),
        (["loss.erasure_chunk=4", "train.strategy=deepspeed"], "ddp only"),
    ],
)
def test_erasure_chunk_conflicts_name_the_field(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs/tiny.yaml", overrides)
    assert e.value.field == "loss.erasure_chunk" and expected in str(e.value)
    assert load_config(REPO / "configs/tiny.yaml", ["loss.erasure_chunk=4"]).loss.erasure_chunk == 4


@pytest.mark.parametrize(
    ("overrides", "field", "expected"),
    [
        (["train.grad_cache_chunk_size=2"], "train.grad_cache_chunk_size", "0 with train.strategy fsdp"),
        (["train.precision=fp16"], "train.precision", "fp32, bf16 or fp64 with train.strategy fsdp"),
        (["loss.erasure_chunk=4"], "loss.erasure_chunk", "ddp only"),
    ],
)
def test_fsdp_refuses_what_it_does_not_support(overrides, field, expected):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs/tiny.yaml", ["train.strategy=fsdp", *overrides])
    assert e.value.field == field and expected in str(e.value)
    cfg = load_config(REPO / "configs/tiny.yaml", ["train.strategy=fsdp", "train.precision=bf16"])
    assert cfg.train.strategy == "fsdp"
