"""Language-bias analyses of an embedding space (paper Table 1, Fig. 1/3 and Fig. 5).

* the language-ID probe (Table 1) is :func:`lancer_dist.language_probe.fit_language_probe`, the one the trainer uses.
* :func:`pool_growth` - nDCG@10 of a multilingual pool as languages are added one by one (Fig. 1/3).
* :func:`tsne_plot` - t-SNE of passages coloured by language (Fig. 5).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from lancer_dist.retrieval.metrics import evaluate
from lancer_dist.retrieval.search import search_arrays

__all__ = ["balanced_sample", "plot_pool_growth", "pool_growth", "tsne_plot"]


def balanced_sample(langs: Sequence[str], per_language: int, seed: int = 0) -> np.ndarray:
    """Indices of at most ``per_language`` items of each language (sorted, reproducible)."""
    rng = np.random.default_rng(seed)
    arr = np.asarray(langs)
    picks = []
    for lang in sorted(set(langs)):
        idx = np.flatnonzero(arr == lang)
        picks.append(rng.choice(idx, size=min(per_language, len(idx)), replace=False))
    return np.sort(np.concatenate(picks)) if picks else np.zeros(0, np.int64)


def pool_growth(
    q_emb: np.ndarray,
    qids: Sequence[str],
    q_langs: Sequence[str],
    p_emb: np.ndarray,
    docids: Sequence[str],
    p_langs: Sequence[str],
    qrels: Mapping[str, Mapping[str, int]],
    language_order: Sequence[str],
    measure: str = "nDCG@10",
    k: int = 100,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> list[tuple[int, str, float]]:
    """For m = 1..L: queries and passages of the first m languages of ``language_order`` form the pool; returns
    ``[(m, added language, measure), ...]`` (Fig. 1/3: how ranking degrades as more languages compete)."""
    ql, pl = np.asarray(q_langs), np.asarray(p_langs)
    qe = transform(q_emb) if transform is not None else q_emb
    pe = transform(p_emb) if transform is not None else p_emb
    out = []
    for m in range(1, len(language_order) + 1):
        langs = set(language_order[:m])
        qi = np.flatnonzero(np.isin(ql, list(langs)))
        pi = np.flatnonzero(np.isin(pl, list(langs)))
        if len(qi) == 0 or len(pi) == 0:
            raise ValueError(
                f"no queries or passages for languages {sorted(langs)} in the pool-growth collection"
            )
        pool_ids = [docids[int(i)] for i in pi]
        pool_set = set(pool_ids)
        sub_qrels = {
            qids[int(i)]: {d: r for d, r in qrels.get(qids[int(i)], {}).items() if d in pool_set} for i in qi
        }
        scores, pos = search_arrays(qe[qi], pe[pi], min(k, len(pi)))
        run = {
            qids[qi[r]]: {pool_ids[p]: float(s) for p, s in zip(pos[r], scores[r]) if p >= 0}
            for r in range(len(qi))
        }
        out.append((m, language_order[m - 1], evaluate(sub_qrels, run, [measure])[measure]))
    return out


def plot_pool_growth(
    curves: Mapping[str, list[tuple[int, str, float]]], path: str | Path, measure: str
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    labels: list[str] = []
    for name, pts in curves.items():
        ax.plot([m for m, _, _ in pts], [v for _, _, v in pts], marker="o", label=name)
        labels = [lang for _, lang, _ in pts]
    ax.set_xticks(range(1, len(labels) + 1))
    ax.set_xticklabels([f"+{lang}" if i else lang for i, lang in enumerate(labels)], rotation=45)
    ax.set_xlabel("languages in the pool")
    ax.set_ylabel(measure)
    ax.set_title(f"{measure} as languages are added to the pool")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def tsne_plot(
    embeddings: Mapping[str, np.ndarray], langs: Sequence[str], path: str | Path, seed: int = 0
) -> Path:
    """One t-SNE panel per embedding space (same passages, coloured by language), saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    names = list(embeddings)
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 4.5), squeeze=False)
    lang_arr = np.asarray(langs)
    languages = sorted(set(langs))
    cmap = plt.get_cmap("tab20" if len(languages) > 10 else "tab10")
    for ax, name in zip(axes[0], names):
        x = np.asarray(embeddings[name], np.float64)
        perplexity = float(max(2, min(30, (len(x) - 1) // 3)))
        y = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
        for j, lang in enumerate(languages):
            sel = lang_arr == lang
            ax.scatter(y[sel, 0], y[sel, 1], s=6, color=cmap(j % cmap.N), label=lang)
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][-1].legend(markerscale=2, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
