"""Session fixtures shared by every test: the offline real backbone and Bible data, built on demand.

Both are cached under ``${LANCER_CACHE}`` (default ``<repo>/.cache/lancer``), so only the first session on a machine
pays for them (~20-60 s for the full model conversion, a few seconds for the small Bible data); parallel sessions
wait on a lock instead of building twice.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# Small enough to build in seconds, large enough that every collection has queries with relevant documents.
TEST_BIBLE_OPTIONS: dict = {
    "passages_per_language": 40,
    "probe_per_language": 16,
    "eval_queries": 24,
    "eval_distractors": 40,
    "negatives": 3,
    "max_groups": 200,
    "max_records_per_shard": 100,
}


@pytest.fixture(scope="session")
def e5_model_dir() -> Path:
    """The full converted multilingual-e5-small (12 layers, 250,002-token tokenizer); also the tokenizer of
    configs/tiny.yaml."""
    from lancer_dist.data.offline import ensure_backbone

    return ensure_backbone()


@pytest.fixture(scope="session")
def bible_data() -> Path:
    """A small Bible data directory: ``erasure/``, ``probe/`` (passages shards), ``retrieval/`` (groups shards),
    ``eval/<name>/`` (BEIR), ``summary.json``, ``splits.json``."""
    from lancer_dist.data.offline import ensure_bible_data
    from lancer_dist.paths import cache_dir

    return ensure_bible_data(cache_dir() / "data" / "bible-test", **TEST_BIBLE_OPTIONS)


@pytest.fixture(scope="session")
def e5_small_model_dir(bible_data: Path) -> Path:
    """multilingual-e5-small shrunk for fast CPU tests: first 2 layers, vocabulary pruned to the test Bible data
    (every text of ``bible_data`` tokenizes exactly as with the full tokenizer)."""
    from lancer_dist.data.offline import ensure_backbone

    return ensure_backbone(layers=2, prune_from=[bible_data])
