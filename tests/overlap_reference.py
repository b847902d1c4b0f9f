"""The overlap statistics as they were before issue 19 (a pair list in Python sets), kept as the reference the
sparse block implementation in analysis/overlap.py and analysis/significance.py is tested against."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet

import numpy as np

from analysis.significance import bootstrap_mean

Neuron = tuple[int, int]

# Permuted statistics within this (relative) distance below the observed one count as ties, so that
# relabellings equal to the observed one up to float rounding are counted as at least as extreme.
_TIE_TOLERANCE = 1e-12


def jaccard(a: AbstractSet[Neuron], b: AbstractSet[Neuron]) -> float | None:
    """|a∩b| / |a∪b|; None when both sets are empty (undefined)."""
    union = len(a | b)
    if union == 0:
        return None
    return len(a & b) / union


def _require_relations(fact_ids: Sequence[str], relations: Mapping[str, str]) -> None:
    """Raise ValueError naming the facts that have no relation."""
    missing = [f for f in fact_ids if f not in relations]
    if missing:
        raise ValueError(f"facts without a relation: {missing}")


def fact_pairs(fact_ids: Sequence[str], relations: Mapping[str, str]) -> list[tuple[str, str, bool]]:
    """All unordered pairs (fact_ids[i], fact_ids[j]) with i < j, each with its same-relation flag."""
    _require_relations(fact_ids, relations)
    return [(a, b, relations[a] == relations[b]) for i, a in enumerate(fact_ids) for b in fact_ids[i + 1 :]]


def _by_layer(neurons: AbstractSet[Neuron], n_layers: int) -> list[frozenset[Neuron]]:
    """Split a neuron set into one set per layer; a layer outside [0, n_layers) is an error."""
    layers: list[set[Neuron]] = [set() for _ in range(n_layers)]
    for layer, index in neurons:
        if not 0 <= layer < n_layers:
            raise ValueError(f"neuron ({layer}, {index}) has a layer outside [0, {n_layers})")
        layers[layer].add((layer, index))
    return [frozenset(s) for s in layers]


def pair_table(
    sets: Mapping[str, AbstractSet[Neuron]], relations: Mapping[str, str], n_layers: int
) -> list[dict]:
    """One row per unordered pair of facts (in the order of `sets`): Jaccard and intersection size,
    over all layers and per layer."""
    per_layer = {f: _by_layer(s, n_layers) for f, s in sets.items()}
    return [
        {
            "fact_a": a,
            "fact_b": b,
            "same_relation": same,
            "jaccard": jaccard(sets[a], sets[b]),
            "intersection": len(sets[a] & sets[b]),
            "jaccard_per_layer": [jaccard(x, y) for x, y in zip(per_layer[a], per_layer[b], strict=True)],
            "intersection_per_layer": [len(x & y) for x, y in zip(per_layer[a], per_layer[b], strict=True)],
        }
        for a, b, same in fact_pairs(list(sets), relations)
    ]


def summarize(values: Sequence[float | None]) -> dict:
    """Count, mean and population standard deviation (ddof=0) of the values that are not None."""
    defined = np.asarray([v for v in values if v is not None], dtype=float)
    return {
        "pairs": len(values),
        "defined": int(defined.size),
        "mean": float(defined.mean()) if defined.size else None,
        "std": float(defined.std(ddof=0)) if defined.size else None,
    }


def _split_summary(rows: list[dict], jaccard_of, intersection_of) -> dict:
    """Summaries of Jaccard and intersection for intra- and inter-relation pairs."""
    return {
        group: {
            "jaccard": summarize([jaccard_of(r) for r in rows if r["same_relation"] == same]),
            "intersection": summarize([intersection_of(r) for r in rows if r["same_relation"] == same]),
        }
        for group, same in (("intra", True), ("inter", False))
    }


def overlap_statistics(
    sets: Mapping[str, AbstractSet[Neuron]], relations: Mapping[str, str], n_layers: int
) -> dict:
    """Intra- vs inter-relation overlap summaries over all layers and per layer, plus the pair table."""
    rows = pair_table(sets, relations, n_layers)
    return {
        "all_layers": _split_summary(rows, lambda r: r["jaccard"], lambda r: r["intersection"]),
        "per_layer": [
            {
                "layer": layer,
                **_split_summary(
                    rows,
                    lambda r, layer=layer: r["jaccard_per_layer"][layer],
                    lambda r, layer=layer: r["intersection_per_layer"][layer],
                ),
            }
            for layer in range(n_layers)
        ],
        "pairs": rows,
    }


def neurons_per_layer(sets: Mapping[str, AbstractSet[Neuron]], n_layers: int) -> list[int]:
    """Number of knowledge neurons in each layer, summed over facts (a shared neuron counts per fact)."""
    counts = [0] * n_layers
    for neurons in sets.values():
        for layer, layer_set in enumerate(_by_layer(neurons, n_layers)):
            counts[layer] += len(layer_set)
    return counts


def _intra_minus_inter(values: np.ndarray, same: np.ndarray) -> np.ndarray:
    """Mean of `values` where `same` minus mean where not, row by row of `same` (NaN when a side is empty)."""
    n_same = same.sum(axis=-1)
    n_other = same.shape[-1] - n_same
    sum_same = (same * values).sum(axis=-1)
    sum_other = values.sum() - sum_same
    with np.errstate(invalid="ignore", divide="ignore"):
        return sum_same / n_same - sum_other / n_other


def permutation_test(
    sets: Mapping[str, AbstractSet[Neuron]],
    relations: Mapping[str, str],
    n_permutations: int = 1000,
    seed: int = 0,
) -> dict:
    """One-sided permutation test that intra-relation pairs have a higher mean Jaccard than inter ones.

    Statistic: mean intra-relation Jaccard minus mean inter-relation Jaccard over pairs whose Jaccard is
    defined. Null: the relation labels are shuffled among facts (`numpy.random.Generator(seed)
    .permutation`, which keeps the group sizes) and the statistic recomputed from the same Jaccard
    values. A relabelling whose statistic is undefined (no defined intra or inter pair) counts as at
    least as extreme, which keeps the test conservative. p = (1 + #{null >= observed}) / (1 + n).
    """
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
    }
    facts = list(sets)
    _require_relations(facts, relations)
    _, labels = np.unique([relations[f] for f in facts], return_inverse=True)
    rows, cols = np.triu_indices(len(facts), k=1)
    values = np.array(
        [jaccard(sets[facts[i]], sets[facts[j]]) for i, j in zip(rows, cols, strict=True)], dtype=float
    )
    defined = ~np.isnan(values)
    rows, cols, values = rows[defined], cols[defined], values[defined]

    same = labels[rows] == labels[cols]
    if not same.any() or same.all():
        result["note"] = f"no defined {'intra' if not same.any() else 'inter'}-relation pairs"
        return result
    observed = float(_intra_minus_inter(values, same))

    rng = np.random.default_rng(seed)
    permuted = np.stack([labels[rng.permutation(len(facts))] for _ in range(n_permutations)])
    null = _intra_minus_inter(values, permuted[:, rows] == permuted[:, cols])
    extreme = np.isnan(null) | (null >= observed - _TIE_TOLERANCE * max(1.0, abs(observed)))

    result["statistic"] = observed
    result["p_value"] = (1 + int(extreme.sum())) / (1 + n_permutations)
    result["intra_mean"] = float(values[same].mean())
    result["inter_mean"] = float(values[~same].mean())
    return result


def bootstrap_ci(values: Sequence[float | None], n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
    """The former pair bootstrap: a percentile bootstrap of the mean of the pairs' values, as if they were
    independent. Its arithmetic is `analysis.significance.bootstrap_mean`, which the package keeps for per-fact
    values; here it is applied to pairs, as the old pipeline did."""
    return bootstrap_mean(values, n_boot, seed, level)
