"""The sparse block statistics (analysis.overlap, analysis.significance) against the pair-list implementation
they replaced (tests/overlap_reference.py) and brute-force references, on invented neuron sets."""

import gzip
import json
import math
from itertools import product

import numpy as np
import overlap_reference as reference
import pytest

from analysis.overlap import incidence, iter_pair_rows, overlap_from_incidence, overlap_statistics, write_pairs_file
from analysis.significance import (
    PairJaccard,
    bootstrap_mean,
    bootstrap_relation_means,
    permutation_test,
    resample_weights,
)


def invented(n_facts, n_relations, seed, n_layers=3, width=6, max_size=5, one_fact_relation=True):
    """Random sets (some empty, some empty in a layer), relations of unequal size and, optionally, a relation
    with a single fact."""
    rng = np.random.default_rng(seed)
    sets, relations = {}, {}
    for k in range(n_facts):
        size = int(rng.integers(0, max_size + 1))
        sets[f"f{k}"] = frozenset((int(rng.integers(0, n_layers)), int(rng.integers(0, width))) for _ in range(size))
        relations[f"f{k}"] = f"R{int(rng.integers(0, n_relations))}"
    if one_fact_relation:
        sets["lonely"] = frozenset({(0, 1), (n_layers - 1, 2)})
        relations["lonely"] = "Z-single"
    return sets, relations


def assert_close(new, old, path="") -> None:
    """Same structure and values; floats to 1e-12 (sums are accumulated in another order)."""
    if isinstance(old, dict):
        assert set(old) <= set(new), path
        for k in old:
            assert_close(new[k], old[k], f"{path}.{k}")
    elif isinstance(old, list):
        assert len(new) == len(old), path
        for k, (a, b) in enumerate(zip(new, old, strict=True)):
            assert_close(a, b, f"{path}[{k}]")
    elif isinstance(old, float):
        assert new == pytest.approx(old, abs=1e-12, rel=1e-12), path
    else:
        assert new == old and type(new) is type(old), path


@pytest.mark.parametrize("seed", range(4))
def test_overlap_statistics_equal_reference(seed):
    sets, relations = invented(40, 4, seed)
    assert_close(overlap_statistics(sets, relations, 3), reference.overlap_statistics(sets, relations, 3))


def test_overlap_statistics_blocks_do_not_change_the_result():
    sets, relations = invented(30, 3, seed=7)
    inc = incidence(sets, relations, 3)
    assert_close(overlap_from_incidence(inc, block=4), overlap_from_incidence(inc, block=1024))
    old = reference.overlap_statistics(sets, relations, 3)
    assert_close(overlap_from_incidence(inc, block=1), {k: old[k] for k in ("all_layers", "per_layer")})
    assert list(iter_pair_rows(inc, block=3)) == old["pairs"]


def test_overlap_statistics_edge_cases():
    everything_empty = {"a": frozenset(), "b": frozenset(), "c": frozenset()}
    relations = {"a": "P", "b": "P", "c": "Q"}
    assert_close(overlap_statistics(everything_empty, relations, 2),
                 reference.overlap_statistics(everything_empty, relations, 2))
    single = {"a": frozenset({(0, 1)})}
    assert_close(overlap_statistics(single, {"a": "P"}, 1), reference.overlap_statistics(single, {"a": "P"}, 1))
    with pytest.raises(ValueError, match="layer outside"):
        overlap_statistics({"a": frozenset({(3, 0)})}, {"a": "P"}, 2)
    with pytest.raises(ValueError, match="'x'"):
        overlap_statistics({"a": frozenset(), "x": frozenset()}, {"a": "P"}, 1)


def test_relation_matrix_is_the_mean_of_each_relation_pair():
    sets, relations = invented(35, 4, seed=3)
    stats = overlap_statistics(sets, relations, 3)
    matrix = stats["relation_matrix"]
    names = matrix["relations"]
    assert names == sorted(set(relations.values()))
    rows = reference.pair_table(sets, relations, 3)
    for (a, ra), (b, rb) in product(enumerate(names), repeat=2):
        between = [r for r in rows if {relations[r["fact_a"]], relations[r["fact_b"]]} == {ra, rb}]
        assert matrix["pairs"][a][b] == len(between)
        jac = [r["jaccard"] for r in between if r["jaccard"] is not None]
        assert matrix["jaccard"][a][b] == (pytest.approx(np.mean(jac), abs=1e-12) if jac else None)
        inter = [r["intersection"] for r in between]
        assert matrix["intersection"][a][b] == (pytest.approx(np.mean(inter), abs=1e-12) if inter else None)
        for layer in range(3):
            jl = [r["jaccard_per_layer"][layer] for r in between if r["jaccard_per_layer"][layer] is not None]
            assert matrix["per_layer_jaccard"][layer][a][b] == (pytest.approx(np.mean(jl), abs=1e-12) if jl else None)
    json.dumps(matrix, allow_nan=False)


def test_pairs_left_out_above_the_threshold_and_streamed_to_a_file(tmp_path):
    sets, relations = invented(12, 3, seed=1)
    stats = overlap_statistics(sets, relations, 3, max_pairs_facts=10)
    assert stats["pairs"] is None and "13 facts" in stats["pairs_omitted"] and "--pairs-file" in stats["pairs_omitted"]
    path = write_pairs_file(incidence(sets, relations, 3), tmp_path / "pairs.jsonl.gz")
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    assert rows == reference.pair_table(sets, relations, 3)


# --- permutation test ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_permutation_test_equals_reference_with_the_same_seed(seed):
    sets, relations = invented(25, 3, seed)
    new = permutation_test(sets, relations, n_permutations=300, seed=seed)
    old = reference.permutation_test(sets, relations, n_permutations=300, seed=seed)
    assert new["p_value"] == old["p_value"]
    for key in ("statistic", "intra_mean", "inter_mean"):
        assert new[key] == pytest.approx(old[key], abs=1e-12)
    assert "method" in new


def test_permutation_null_distribution_equals_reference():
    # every relabelling's statistic, not only the count beyond the observed one, against the pair list
    sets, relations = invented(20, 3, seed=11)
    pairs = PairJaccard(incidence(sets, relations), block=3)
    facts = list(sets)
    rows = reference.pair_table(sets, relations, 3)
    index = {f: k for k, f in enumerate(facts)}
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = pairs.codes[rng.permutation(len(facts))]
        intra = [r["jaccard"] for r in rows if r["jaccard"] is not None
                 and labels[index[r["fact_a"]]] == labels[index[r["fact_b"]]]]
        inter = [r["jaccard"] for r in rows if r["jaccard"] is not None
                 and labels[index[r["fact_a"]]] != labels[index[r["fact_b"]]]]
        statistic, mean_intra, mean_inter = pairs.statistic(labels)
        assert mean_intra == pytest.approx(np.mean(intra), abs=1e-12)
        assert mean_inter == pytest.approx(np.mean(inter), abs=1e-12)
        assert statistic == pytest.approx(np.mean(intra) - np.mean(inter), abs=1e-12)


# --- bootstrap over facts --------------------------------------------------------------------------------


def brute_force_resample_means(sets, relations, weights):
    """The resampled data written out: w_k copies of fact k; mean Jaccard over pairs of copies of two distinct
    facts, intra and inter."""
    facts = list(sets)
    copies = [k for k, w in enumerate(weights) for _ in range(int(w))]
    intra, inter = [], []
    for x in range(len(copies)):
        for y in range(x + 1, len(copies)):
            a, b = facts[copies[x]], facts[copies[y]]
            if a == b:
                continue
            value = reference.jaccard(sets[a], sets[b])
            if value is not None:
                (intra if relations[a] == relations[b] else inter).append(value)
    return (np.mean(intra) if intra else math.nan), (np.mean(inter) if inter else math.nan)


def test_resample_weights_stay_within_relations():
    codes = np.array([0, 0, 1, 2, 2, 2, 1])
    rng = np.random.default_rng(0)
    for _ in range(50):
        w = resample_weights(codes, 3, rng)
        assert np.bincount(codes, weights=w).tolist() == [2, 2, 3]
        assert (w >= 0).all() and (w == np.round(w)).all()


def test_bootstrap_equals_brute_force_resamples():
    sets, relations = invented(18, 3, seed=4)
    result = bootstrap_relation_means(sets, relations, n_boot=40, seed=2, level=0.9)
    pairs = PairJaccard(incidence(sets, relations))
    rng = np.random.default_rng(2)
    draws = np.array([brute_force_resample_means(sets, relations, resample_weights(pairs.codes, pairs.n_relations,
                                                                                    rng)) for _ in range(40)])
    old = reference.overlap_statistics(sets, relations, 3)["all_layers"]
    for k, (name, split) in enumerate((("intra_jaccard", "intra"), ("inter_jaccard", "inter"))):
        finite = draws[np.isfinite(draws[:, k]), k]
        low, high = np.quantile(finite, [0.05, 0.95])
        assert result[name]["mean"] == pytest.approx(old[split]["jaccard"]["mean"], abs=1e-12)
        assert result[name]["low"] == pytest.approx(low, abs=1e-12)
        assert result[name]["high"] == pytest.approx(high, abs=1e-12)
        assert result[name]["undefined_resamples"] == 40 - len(finite)
        assert result[name]["n_boot"] == 40 and result[name]["seed"] == 2 and "facts" in result[name]["method"]


def test_fact_bootstrap_is_wider_than_a_pair_bootstrap_when_facts_differ():
    # Half the facts of each relation share a large core of neurons, the other half little: pairs through one
    # fact are correlated, which a bootstrap over pairs ignores.
    rng = np.random.default_rng(0)
    sets, relations = {}, {}
    for r, k in product(range(4), range(16)):
        core = {(0, i) for i in range(8)} if rng.random() < 0.5 else set()
        sets[f"r{r}f{k}"] = frozenset(core | {(1, int(i)) for i in rng.choice(40, 3, replace=False)})
        relations[f"r{r}f{k}"] = f"R{r}"
    facts = bootstrap_relation_means(sets, relations, n_boot=400, seed=0)["intra_jaccard"]
    values = np.array([r["jaccard"] for r in reference.pair_table(sets, relations, 2) if r["same_relation"]])
    means = values[np.random.default_rng(0).integers(0, len(values), (400, len(values)))].mean(1)
    low, high = np.quantile(means, [0.025, 0.975])
    assert facts["high"] - facts["low"] > 2 * (high - low)


def test_bootstrap_rejects_bad_arguments():
    sets, relations = invented(5, 2, seed=0)
    with pytest.raises(ValueError, match="level"):
        bootstrap_relation_means(sets, relations, level=1.0)
    with pytest.raises(ValueError, match="n_boot"):
        bootstrap_relation_means(sets, relations, n_boot=0)


def test_bootstrap_mean_resamples_the_values_one_resample_at_a_time():
    values = [0.1, None, 0.5, 0.2, 0.9, 0.4]
    got = bootstrap_mean(values, n_boot=300, seed=3)
    data = np.array([v for v in values if v is not None])
    rng = np.random.default_rng(3)
    means = [data[rng.integers(0, data.size, size=data.size)].mean() for _ in range(300)]
    low, high = np.quantile(means, [0.025, 0.975])
    assert got["mean"] == pytest.approx(data.mean()) and got["low"] == pytest.approx(low)
    assert got["high"] == pytest.approx(high) and low < data.mean() < high
    assert bootstrap_mean([None], n_boot=10)["mean"] is None
