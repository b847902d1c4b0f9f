"""Significance of "facts of one relation share more knowledge neurons than facts of different relations",
exact over every pair of facts, from the sparse pair entries of `analysis.overlap` (pairs that share a neuron).

- Permutation test. Statistic: mean intra-relation Jaccard minus mean inter-relation Jaccard over the pairs
  whose Jaccard is defined (not both sets empty). Null: the relation labels shuffled among facts
  (`numpy.random.Generator(seed).permutation`, group sizes kept), the statistic recomputed from the same
  Jaccard values: a relabelling costs one pass over the nonzero Jaccard entries (the other pairs add 0 to the
  sums), and the defined-pair counts follow from where the empty sets land. A relabelling whose statistic is
  undefined counts as at least as extreme (conservative). p = (1 + #{null >= observed}) / (1 + n).
- Bootstrap over facts within relations. Pairs that share a fact are not independent, so resampling pairs
  understates the uncertainty. Each resample draws, within every relation, as many facts as it has, with
  replacement; a fact drawn w times carries weight w, and the resampled mean over pairs is
  sum_{i<j} w_i w_j J_ij / sum_{i<j defined} w_i w_j over pairs of distinct original facts (two copies of one
  fact are not a pair of facts). The numerator is one pass over the nonzero entries, the denominator block
  sums of the weights by relation. Percentile interval of the resampled means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet

import numpy as np
from scipy import sparse

from analysis.overlap import BLOCK_ROWS, Incidence, Neuron, incidence, jaccard_entries

# Permuted statistics within this (relative) distance below the observed one count as ties, so that
# relabellings equal to the observed one up to float rounding are counted as at least as extreme.
_TIE_TOLERANCE = 1e-12

PERMUTATION_METHOD = ("relation labels shuffled among facts (group sizes kept); statistic = mean intra- minus mean "
                      "inter-relation Jaccard over every pair of facts with a defined Jaccard, exact (sparse pair "
                      "entries); p = (1 + #{null >= observed}) / (1 + n_permutations)")
BOOTSTRAP_METHOD = ("percentile bootstrap over facts, resampled with replacement within each relation (not over "
                    "pairs, which share facts and are dependent); each resample's mean over pairs of distinct "
                    "facts weighted by the product of their multiplicities, exact by block sums")


def _pairs(n: np.ndarray) -> np.ndarray:
    return n * (n - 1) / 2


def _csr(rows: np.ndarray, cols: np.ndarray, values: np.ndarray, n: int) -> sparse.csr_matrix:
    """(n, n) CSR of entries already sorted by row."""
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    return sparse.csr_matrix((values, cols, indptr), shape=(n, n))


class PairJaccard:
    """The nonzero Jaccard values over all layers of an incidence as an upper-triangular sparse matrix
    (n_facts, n_facts) with what the statistics need about the other pairs (0, or undefined between empty sets).
    Build it once and pass it to `permutation_test` and `bootstrap_relation_means` (`pairs=`)."""

    def __init__(self, inc: Incidence, block: int = BLOCK_ROWS):
        rows, cols, values = jaccard_entries(inc, block)  # sorted by row
        self.n = len(inc.facts)
        self.codes = inc.codes
        self.n_relations = len(inc.relations)
        self.upper = _csr(rows, cols, values, self.n)
        self.row_counts = np.diff(self.upper.indptr)
        self.cols = self.upper.indices
        self._label_type = np.int8 if self.n_relations < 128 else np.int32
        self._col_labels = np.empty(len(self.cols), self._label_type)
        self._same = np.empty(len(self.cols), bool)
        self.empty = inc.sizes == 0
        self.total = float(values.sum())
        self.defined = _pairs(self.n) - _pairs(int(self.empty.sum()))
        self.intra_pairs = float(_pairs(np.bincount(self.codes, minlength=self.n_relations)).sum())
        same = self.codes[rows] == self.codes[cols]
        self.intra_upper = _csr(rows[same], cols[same], values[same], self.n)
        self.inter_upper = _csr(rows[~same], cols[~same], values[~same], self.n)

    @classmethod
    def of(cls, sets: Mapping[str, AbstractSet[Neuron]], relations: Mapping[str, str]) -> PairJaccard:
        return cls(incidence(sets, relations))

    def intra_sum(self, labels: np.ndarray) -> float:
        """Sum of the Jaccard values of the pairs that share a label (labels: (n_facts,) relation codes). One pass
        over the nonzero entries into reused buffers (the permutation test calls it once a relabelling)."""
        labels = labels.astype(self._label_type)
        np.take(labels, self.cols, out=self._col_labels, mode="clip")
        np.equal(np.repeat(labels, self.row_counts), self._col_labels, out=self._same)
        return float(np.sum(self.upper.data, where=self._same))

    def intra_defined(self, labels: np.ndarray) -> float:
        """Number of pairs with the same label and a defined Jaccard."""
        return self.intra_pairs - float(_pairs(np.bincount(labels[self.empty], minlength=self.n_relations)).sum())

    def statistic(self, labels: np.ndarray) -> tuple[float, float, float]:
        """(intra mean - inter mean, intra mean, inter mean); NaN where a side has no defined pair."""
        d_intra = self.intra_defined(labels)
        d_inter = self.defined - d_intra
        s_intra = self.intra_sum(labels)
        intra = s_intra / d_intra if d_intra else np.nan
        inter = (self.total - s_intra) / d_inter if d_inter else np.nan
        return intra - inter, intra, inter


def permutation_test(
    sets: Mapping[str, AbstractSet[Neuron]],
    relations: Mapping[str, str],
    n_permutations: int = 1000,
    seed: int = 0,
    pairs: PairJaccard | None = None,
) -> dict:
    """One-sided permutation test that intra-relation pairs have a higher mean Jaccard than inter ones (see the
    module docstring). `pairs`: `PairJaccard.of(sets, relations)`, when already built."""
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be at least 1, got {n_permutations}")
    result = {
        "statistic": None,
        "p_value": None,
        "intra_mean": None,
        "inter_mean": None,
        "n_permutations": n_permutations,
        "seed": seed,
        "alternative": "intra > inter",
        "method": PERMUTATION_METHOD,
    }
    pairs = pairs if pairs is not None else PairJaccard.of(sets, relations)
    observed, intra, inter = pairs.statistic(pairs.codes)
    if np.isnan(intra) or np.isnan(inter):
        result["note"] = f"no defined {'intra' if np.isnan(intra) else 'inter'}-relation pairs"
        return result
    rng = np.random.default_rng(seed)
    null = np.array([pairs.statistic(pairs.codes[rng.permutation(pairs.n)])[0] for _ in range(n_permutations)])
    extreme = np.isnan(null) | (null >= observed - _TIE_TOLERANCE * max(1.0, abs(observed)))
    result.update(statistic=float(observed), p_value=(1 + int(extreme.sum())) / (1 + n_permutations),
                  intra_mean=float(intra), inter_mean=float(inter))
    return result


def resample_weights(codes: np.ndarray, n_relations: int, rng: np.random.Generator) -> np.ndarray:
    """(n_facts,) multiplicities of one resample: within each relation (in code order) as many draws with
    replacement as the relation has facts."""
    weights = np.zeros(len(codes))
    for r in range(n_relations):
        members = np.flatnonzero(codes == r)
        if len(members):
            weights += np.bincount(members[rng.integers(0, len(members), len(members))], minlength=len(codes))
    return weights


def _weighted_pairs(w: np.ndarray, codes: np.ndarray, n_relations: int) -> tuple[float, float]:
    """(intra, inter) sums of w_i w_j over pairs of distinct facts i < j."""
    per_relation = np.bincount(codes, weights=w, minlength=n_relations)
    squares = np.bincount(codes, weights=w * w, minlength=n_relations)
    intra = float(((per_relation**2 - squares) / 2).sum())
    inter = float((per_relation.sum() ** 2 - (per_relation**2).sum()) / 2)
    return intra, inter


def weighted_means(pairs: PairJaccard, w: np.ndarray) -> tuple[float, float]:
    """(intra, inter) weighted mean Jaccard of one resample with multiplicities w (NaN where no defined pair)."""
    num_intra, num_inter = float(w @ (pairs.intra_upper @ w)), float(w @ (pairs.inter_upper @ w))
    all_intra, all_inter = _weighted_pairs(w, pairs.codes, pairs.n_relations)
    empty_intra, empty_inter = _weighted_pairs(w * pairs.empty, pairs.codes, pairs.n_relations)
    d_intra, d_inter = all_intra - empty_intra, all_inter - empty_inter
    return (num_intra / d_intra if d_intra else np.nan), (num_inter / d_inter if d_inter else np.nan)


def _interval(point: float, draws: np.ndarray, level: float, n_boot: int, seed: int) -> dict:
    finite = draws[np.isfinite(draws)]
    result = {"mean": None, "low": None, "high": None, "level": level, "n_boot": n_boot, "seed": seed,
              "undefined_resamples": int(len(draws) - len(finite)), "method": BOOTSTRAP_METHOD}
    if np.isnan(point) or not len(finite):
        return result
    low, high = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    result.update(mean=float(point), low=float(low), high=float(high))
    return result


def bootstrap_relation_means(
    sets: Mapping[str, AbstractSet[Neuron]],
    relations: Mapping[str, str],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    pairs: PairJaccard | None = None,
) -> dict:
    """{"intra_jaccard", "inter_jaccard"}: each the mean over defined pairs and its percentile interval from a
    bootstrap over facts within relations (see the module docstring), with level, n_boot, seed, method and the
    number of resamples where the mean was undefined (left out of the quantiles)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    pairs = pairs if pairs is not None else PairJaccard.of(sets, relations)
    point = weighted_means(pairs, np.ones(pairs.n))
    rng = np.random.default_rng(seed)
    draws = np.array([weighted_means(pairs, resample_weights(pairs.codes, pairs.n_relations, rng))
                      for _ in range(n_boot)]).reshape(n_boot, 2)
    return {name: _interval(point[k], draws[:, k], level, n_boot, seed)
            for k, name in enumerate(("intra_jaccard", "inter_jaccard"))}


def bootstrap_mean(values: Sequence[float | None], n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """Percentile bootstrap interval of the mean of independent values, one per fact (None: left out).

    For per-fact quantities such as a restoration's effect; pair statistics, whose pairs share facts, use
    `bootstrap_relation_means` instead. Returns {mean, low, high, level, n_boot, seed} (None when no value).
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    data = np.asarray([v for v in values if v is not None], dtype=float)
    result = {"mean": None, "low": None, "high": None, "level": level, "n_boot": n_boot, "seed": seed}
    if data.size == 0:
        return result
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(n_boot, data.size))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    result.update(mean=float(data.mean()), low=float(low), high=float(high))
    return result
