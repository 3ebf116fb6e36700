"""The one text rule: how a passage record becomes the text that is tokenised.

Training (:mod:`lancer_dist.data.stream`), the probe, evaluation's corpus reader (:mod:`lancer_dist.retrieval.store`)
and mining all join a passage's title and text here; tokenisation is :class:`lancer_dist.data.collate.Collator`'s.
Kept free of torch so that the corpus reader stays light.
"""

from __future__ import annotations

from typing import Any

__all__ = ["passage_text"]


def passage_text(p: dict[str, Any]) -> str:
    """The text a passage is encoded from: ``"<title> <text>"`` when a non-empty title is stored, else the text.

    A title of ``"-"`` counts as none: Tevatron's MS MARCO records (and other exports) write ``"-"`` for a passage
    without a title, and encoding it would prefix thousands of passages with the same meaningless token."""
    title = str(p.get("title") or "").strip()
    return f"{title} {p['text']}" if title and title != "-" else str(p["text"])
