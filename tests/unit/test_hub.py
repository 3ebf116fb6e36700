"""Hub ids wherever a model path is accepted (issue #11), tested without a hub: a real Hugging Face cache layout
(``models--owner--name/refs/<rev>`` -> ``snapshots/<commit>/``) read by huggingface_hub / transformers under
``HF_HUB_OFFLINE=1`` in a fresh process (the offline flag is read at import time)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lancer_dist.config import ConfigError, ModelConfig
from lancer_dist.model.hub import looks_like_hub_id, resolve_model_dir
from tests.unit.test_backbones import _save

REPO = "lancer-test/tiny-bert"
SHAS = {"main": "1" * 40, "v2": "2" * 40}


def _fake_hub_cache(tmp_path: Path) -> Path:
    """Two revisions of a saved tiny encoder (different random weights) in the hub cache layout."""
    cache = tmp_path / "hub"
    repo_dir = cache / ("models--" + REPO.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True)
    for seed, (rev, sha) in enumerate(SHAS.items()):
        saved, _ = _save(tmp_path / f"src{seed}", "bert", "mean", seed=seed, query_prefix="query: ")
        shutil.copytree(saved, repo_dir / "snapshots" / sha)
        (repo_dir / "refs" / rev).write_text(sha)
    return cache


PROGRAM = r"""
import json, sys
import numpy as np
import torch
from lancer_dist.config import ConfigError, ModelConfig
from lancer_dist.model import BiEncoder, load_tokenizer
from lancer_dist.model.hub import resolve_model_dir
from lancer_dist.data.collate import Collator
from lancer_dist.retrieval.encoder_io import EncoderSpec, load_encoder

cache, repo = sys.argv[1], sys.argv[2]
texts = ["the cat sat on the mat", "a dog"]
out = {}
for rev in ("main", "v2"):
    # training path: from_pretrained with the model section's hub options
    cfg = ModelConfig(name_or_path=repo, revision=rev, cache_dir=cache, pooling="mean", normalize=True, dropout=0.0)
    model = BiEncoder.from_config(cfg).eval()
    ids, mask = Collator.from_config(cfg, load_tokenizer(cfg)).passages(texts)
    with torch.no_grad():
        train_emb = model.encode(ids, mask).numpy()
    # evaluation path: the hub id resolved to its snapshot, loaded like any encoder directory
    snap = resolve_model_dir(repo, "eval.model", revision=rev, cache_dir=cache)
    eval_emb = load_encoder(EncoderSpec(str(snap), ModelConfig()), device="cpu").encode(texts, is_query=False)
    out[rev] = {"snapshot": str(snap), "train": train_emb.tolist(), "eval": eval_emb.tolist()}
try:
    resolve_model_dir("lancer-test/not-cached", "eval.model", cache_dir=cache)
except ConfigError as e:
    out["missing_field"] = e.field
print("RESULT " + json.dumps(out))
"""


def test_hub_ids_load_from_a_hub_cache_at_the_given_revision(tmp_path):
    cache = _fake_hub_cache(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path.cwd()), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HOME", None)
    proc = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(cache), REPO],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    res = json.loads(line[len("RESULT ") :])
    import numpy as np

    for rev, sha in SHAS.items():
        assert res[rev]["snapshot"].endswith(f"snapshots/{sha}")
        # the weights in that snapshot, loaded by path in this process, give the same embeddings
        from lancer_dist.retrieval.encoder_io import EncoderSpec, load_encoder

        local = load_encoder(EncoderSpec(res[rev]["snapshot"], ModelConfig()), device="cpu")
        ref = local.encode(["the cat sat on the mat", "a dog"], is_query=False)
        assert np.abs(np.array(res[rev]["train"]) - ref).max() < 1e-5
        assert np.abs(np.array(res[rev]["eval"]) - ref).max() < 1e-5
    assert (
        np.abs(np.array(res["main"]["train"]) - np.array(res["v2"]["train"])).max() > 1e-3
    )  # revision matters
    assert res["missing_field"] == "eval.model"


def test_hub_id_syntax_and_local_directories(tmp_path):
    assert looks_like_hub_id("intfloat/multilingual-e5-large") and looks_like_hub_id(
        "bert-base-multilingual-cased"
    )
    for bad in ("./model", "/abs/path", "a/b/c", "../x", "a/../b", ""):
        assert not looks_like_hub_id(bad), bad
    assert resolve_model_dir(str(tmp_path), "eval.model") == tmp_path  # a directory is used as it is
    with pytest.raises(ConfigError) as e:  # a missing path that is no hub id fails at once, naming the field
        resolve_model_dir(str(tmp_path / "nope" / "deeper"), "model.name_or_path")
    assert e.value.field == "model.name_or_path"
