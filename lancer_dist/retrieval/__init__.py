"""Evaluation at scale: Ray encoding, sharded FAISS search, IR metrics, post-hoc baselines, language-bias analyses.

Data flow: collection (:mod:`~lancer_dist.retrieval.collections`: BEIR and benchmark layouts) -> corpus ->
:mod:`~lancer_dist.retrieval.encode` (Ray actor pool) -> :mod:`~lancer_dist.retrieval.store`
(sharded embeddings) -> :mod:`~lancer_dist.retrieval.search` (FAISS per shard + exact merge) ->
:mod:`~lancer_dist.retrieval.metrics` -> MLflow (through the training tracker, :mod:`lancer_dist.tracking`).
:mod:`~lancer_dist.retrieval.evaluate` (``lancer eval``) ties them together with
:mod:`~lancer_dist.retrieval.posthoc` (LSAR, LEACE) and :mod:`~lancer_dist.retrieval.analysis` (probe, pool growth,
t-SNE). Submodules are imported on use, so ``import lancer_dist.retrieval`` stays cheap.
"""
