"""lancer-dist: distributed training of language-invariant multilingual dense retrievers (LANCER)."""

__version__ = "0.1.0"
