"""The language probe (paper §5.3, Fig. 4): how much language identity a linear classifier recovers from embeddings.

At step 0 and every ``probe.every`` steps the trainer encodes a held-out multilingual train/test split with the
current encoder, fits the project's one language probe (:func:`lancer_dist.language_probe.fit_language_probe`, the
same function ``lancer eval`` uses: logistic regression with C cross-validated on the train split) and logs its
training log loss, its test accuracy and that accuracy's 95 % interval. Language-invariant embeddings make the classifier's job harder:
the loss rises and the accuracy falls towards chance (``1 / num_languages``).

The split is plain ``(text, language)`` pairs, so any source works (the erasure shards, a held-out file, a test's
synthetic data); :meth:`LanguageProbe.from_pool` draws a balanced, disjoint split from a pool of pairs.

:func:`build_probe` is the trainer's probe: its pairs come from shards (``probe.path``, default the erasure data)
read by :func:`load_probe_pool` through the same checked reader as the training stream
(:func:`lancer_dist.data.shards.load_shard`: the file exists, the tar is whole, sha256 and record counts match the
manifest; every record is checked). Only shards holding a language the probe uses are opened, in a seeded order,
and reading stops once every language has ``POOL_FACTOR`` times the texts the split needs, so the memory (and the
start-up time) stays bounded however large the data is. A bad shard or record raises a ``DataError`` naming it,
or with ``data.skip_bad_records`` is counted; the counts are logged and reported with the probe's metrics
(``probe/skipped_records``, ``probe/skipped_shards``).
"""

from __future__ import annotations

import logging
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lancer_dist.config import RunConfig
from lancer_dist.data.errors import DataError, SkipCounter

__all__ = ["POOL_FACTOR", "LanguageProbe", "build_probe", "load_probe_pool", "probe_curve_png"]

log = logging.getLogger(__name__)

# The pool the probe's split is drawn from holds up to POOL_FACTOR x (train + test) distinct texts per language.
POOL_FACTOR = 4

EncodeFn = Callable[[list[str]], Any]


class LanguageProbe:
    """A fixed held-out train/test split of ``(text, language)`` pairs and the classifier fitted on their embeddings.

    Args:
        train: pairs the classifier is fitted on.
        test: pairs it is scored on (every test language must occur in ``train``).
        seed: the cross-validation folds' and the classifier's random state.
        max_iter: lbfgs iterations; generous so the fit converges on hundreds of dimensions.
        cv_folds: folds of the cross-validation that chooses the regularisation on the train split.
    """

    def __init__(
        self,
        train: Sequence[tuple[str, str]],
        test: Sequence[tuple[str, str]],
        *,
        seed: int = 0,
        max_iter: int = 2000,
        cv_folds: int = 5,
    ):
        for name, split in (("train", train), ("test", test)):
            for i, pair in enumerate(split):
                if not (
                    isinstance(pair, tuple | list)
                    and len(pair) == 2
                    and all(isinstance(x, str) for x in pair)
                ):
                    raise ValueError(
                        f"language probe {name} split, record {i}: expected (text, language), got {pair!r}"
                    )
        self.train_texts = [t for t, _ in train]
        self.test_texts = [t for t, _ in test]
        self.languages = sorted({lang for _, lang in train})
        if len(self.languages) < 2:
            raise ValueError(f"language probe: the train split needs >= 2 languages, got {self.languages}")
        unknown = sorted({lang for _, lang in test} - set(self.languages))
        if unknown:
            raise ValueError(f"language probe: test languages {unknown} do not occur in the train split")
        if not test:
            raise ValueError("language probe: the test split is empty")
        index = {lang: i for i, lang in enumerate(self.languages)}
        self.y_train = np.array([index[lang] for _, lang in train], dtype=np.int64)
        self.y_test = np.array([index[lang] for _, lang in test], dtype=np.int64)
        self.seed = seed
        self.max_iter = max_iter
        self.cv_folds = cv_folds
        self.classifier: Any = None  # the last fitted sklearn Pipeline (scaler + logistic regression)
        # Bad shards / records skipped while reading the probe's data (reported with every evaluation).
        self.skipped: dict[str, int] = {}

    @classmethod
    def from_pool(
        cls,
        pairs: Iterable[tuple[str, str]],
        train_per_language: int,
        test_per_language: int,
        *,
        languages: Sequence[str] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> LanguageProbe:
        """A balanced split: ``train_per_language`` + ``test_per_language`` distinct texts of every language.

        Duplicate texts are dropped first (a text in both splits would measure memorisation). Raises naming the
        languages that have too few texts.
        """
        by_lang: dict[str, list[str]] = defaultdict(list)
        seen: set[str] = set()
        for text, lang in pairs:
            if text in seen or not text.strip():
                continue
            seen.add(text)
            by_lang[lang].append(text)
        langs = sorted(by_lang) if languages is None else list(languages)
        need = train_per_language + test_per_language
        short = {lang: len(by_lang.get(lang, [])) for lang in langs if len(by_lang.get(lang, [])) < need}
        if short:
            raise ValueError(f"language probe: need {need} distinct texts per language, have only {short}")
        rng = random.Random(seed)
        train: list[tuple[str, str]] = []
        test: list[tuple[str, str]] = []
        for lang in langs:
            texts = rng.sample(by_lang[lang], need)
            train += [(t, lang) for t in texts[:train_per_language]]
            test += [(t, lang) for t in texts[train_per_language:]]
        return cls(train, test, seed=seed, **kwargs)

    @property
    def chance(self) -> float:
        return 1.0 / len(self.languages)

    def _encode(self, encode_fn: EncodeFn) -> tuple[np.ndarray, np.ndarray]:
        texts = self.train_texts + self.test_texts
        x = encode_fn(texts)
        if hasattr(x, "detach"):  # a torch tensor
            x = x.detach().float().cpu().numpy()
        x_ND = np.asarray(x, dtype=np.float64)
        if x_ND.ndim != 2 or x_ND.shape[0] != len(texts):
            raise ValueError(
                f"language probe: encode_fn returned shape {x_ND.shape}, expected ({len(texts)}, dim)"
            )
        if not np.isfinite(x_ND).all():
            raise ValueError("language probe: encode_fn returned non-finite embeddings")
        n = len(self.train_texts)
        return x_ND[:n], x_ND[n:]

    def evaluate(self, encode_fn: EncodeFn) -> dict[str, float]:
        """Encode both splits with ``encode_fn`` (list[str] -> [N, D] array), fit, and score.

        Returns ``probe_train_loss`` (mean log loss of the fitted classifier on its train split, the left panel of
        Fig. 4), ``probe_test_accuracy`` (right panel) with its 95 % Wilson interval ``probe_test_accuracy_low`` /
        ``probe_test_accuracy_high`` over ``probe_test_size`` passages, ``probe_C`` (the cross-validated
        regularisation), ``probe_train_accuracy``, ``probe_test_loss``, ``probe_chance`` (1 / number of languages),
        ``probe_num_languages``, L_C over all probe passages with its floor (``probe_erasure_abs``,
        ``probe_erasure_floor``, ``probe_erasure_over_floor``) and the skipped-data counts.
        """
        from lancer_dist.language_probe import fit_language_probe, population_erasure

        x_train, x_test = self._encode(encode_fn)
        # L_C over every probe passage: the population value, beside its (much lower) floor
        lc = population_erasure(
            np.concatenate([x_train, x_test]), self.y_train.tolist() + self.y_test.tolist()
        )
        fit = fit_language_probe(
            x_train,
            self.y_train.tolist(),
            x_test,
            self.y_test.tolist(),
            cv_folds=self.cv_folds,
            seed=self.seed,
            max_iter=self.max_iter,
        )
        self.classifier = fit.classifier
        return {
            **fit.as_metrics("probe_"),
            **{f"probe_{k}": v for k, v in lc.items()},
            "probe_skipped_records": float(self.skipped.get("bad_records", 0)),
            "probe_skipped_shards": float(self.skipped.get("bad_shards", 0)),
        }

    def __repr__(self) -> str:
        counts = Counter(self.y_train.tolist())
        per = ", ".join(f"{lang}={counts[i]}" for i, lang in enumerate(self.languages))
        return f"LanguageProbe(train={len(self.train_texts)} [{per}], test={len(self.test_texts)})"


def load_probe_pool(
    path: str | Path,
    languages: Sequence[str] | None,
    per_language: int,
    *,
    skip_bad: bool,
    seed: int = 0,
    counter: SkipCounter | None = None,
) -> tuple[list[tuple[str, str]], list[str], SkipCounter]:
    """Up to ``per_language`` distinct ``(text, language)`` pairs per language from the shards at ``path``.

    Returns the pairs, the languages (``languages``, or every language of the manifest) and the skip counter. Only
    shards whose manifest counts include a wanted language are read (a bad shard of another language is never
    opened), each through :func:`~lancer_dist.data.shards.load_shard` and every record of a wanted language (or with
    no valid language) through :func:`~lancer_dist.data.shards.check_passage`.
    """
    from lancer_dist.data.shards import check_passage, load_shard, read_manifest

    manifest = read_manifest(path)
    langs = list(languages) if languages else manifest.languages
    wanted = set(langs)
    known = set(manifest.totals)
    counter = counter if counter is not None else SkipCounter()
    texts: dict[str, dict[str, None]] = {lang: {} for lang in langs}  # insertion-ordered sets
    shards = [s for s in manifest.shards if any(s.languages.get(lang, 0) > 0 for lang in wanted)]
    random.Random(seed).shuffle(shards)
    for shard in shards:
        if all(len(texts[lang]) >= per_language for lang in langs):
            break
        if all(len(texts[lang]) >= per_language for lang in wanted if shard.languages.get(lang, 0) > 0):
            continue  # every wanted language of this shard has enough texts already
        where = f"{shard.name} (in {manifest.root})"
        try:
            records = load_shard(manifest, shard)
            held = Counter(r.get("lang") if isinstance(r, dict) else None for _, r in records)
            if all(isinstance(k, str) and k in known for k in held) and dict(held) != {
                k: v for k, v in shard.languages.items() if v
            }:
                raise DataError(
                    where,
                    None,
                    "languages",
                    f"shard holds {dict(held)}, manifest says {shard.languages}",
                    reason="manifest_mismatch",
                )
        except DataError as e:
            if not skip_bad:
                raise
            counter.skip(e, shard_level=True)
            continue
        for key, rec in records:
            lang = rec.get("lang") if isinstance(rec, dict) else None
            if isinstance(lang, str) and lang in known and lang not in wanted:
                continue  # a record of a language the probe does not use
            try:
                check_passage(where, key, rec, known)
            except DataError as e:
                if not skip_bad:
                    raise
                counter.skip(e)
                continue
            bucket = texts[rec["lang"]]
            if len(bucket) < per_language and rec["text"].strip():
                bucket[rec["text"]] = None
    pairs = [(text, lang) for lang in langs for text in texts[lang]]
    return pairs, langs, counter


def build_probe(cfg: RunConfig, languages: Sequence[str] | None = None) -> LanguageProbe | None:
    """The trainer's language probe (None when ``probe.enabled`` is false or there is no data to probe on):
    a balanced split of ``probe.path`` (held-out passages the training stream never reads; none: no probe) over ``languages`` (default: the manifest's),
    read through the checked shard reader (see the module docstring)."""
    pc = cfg.probe
    path = pc.path
    if not pc.enabled:
        return None
    if not path:
        log.warning(
            "language probe off: probe.path names no held-out passages (the erasure data would test it on passages "
            "the model trains on); give a shard directory the training stream never reads, e.g. the probe/ of "
            "`lancer data bible` or `lancer data passages OUT -i c4:DIR --split validation`"
        )
        return None
    need = pc.train_per_language + pc.test_per_language
    pairs, langs, counter = load_probe_pool(
        path, languages, POOL_FACTOR * need, skip_bad=cfg.data.skip_bad_records, seed=cfg.train.seed
    )
    skipped = counter.as_dict()
    if skipped:
        log.warning("language probe data %s: skipped %s", path, skipped)
    probe = LanguageProbe.from_pool(
        pairs,
        pc.train_per_language,
        pc.test_per_language,
        languages=langs,
        seed=cfg.train.seed,
        cv_folds=pc.cv_folds,
    )
    probe.skipped = skipped
    return probe


def probe_curve_png(
    history: Sequence[Mapping[str, float]] | Mapping[str, Sequence[Mapping[str, float]]],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Write Fig. 4 as a PNG: probe training loss (left) and test accuracy (right) against the training step.

    ``history`` is one run's list of ``{"step": s, "probe_train_loss": ..., "probe_test_accuracy": ...,
    "probe_chance": ...}`` records, or ``{label: records}`` to draw several runs (e.g. baseline vs LANCER) together.
    """
    # A bare Figure (no pyplot): no global figure state, no display; savefig renders PNG with the Agg backend.
    from matplotlib.figure import Figure

    runs = dict(history) if isinstance(history, Mapping) else {"": list(history)}
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    chance = None
    for label, records in runs.items():
        records = sorted(records, key=lambda r: r["step"])
        steps = [r["step"] for r in records]
        ax_loss.plot(steps, [r["probe_train_loss"] for r in records], marker="o", label=label or None)
        ax_acc.plot(steps, [r["probe_test_accuracy"] for r in records], marker="o", label=label or None)
        chance = next((r["probe_chance"] for r in records if "probe_chance" in r), chance)
    if chance is not None:
        ax_acc.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    ax_loss.set(xlabel="training step", ylabel="probe training loss", title="Language probe: train loss")
    ax_acc.set(xlabel="training step", ylabel="probe test accuracy", title="Language probe: test accuracy")
    ax_acc.set_ylim(0.0, 1.02)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out
