"""statistics_kn: hand-computed Jaccard and intersection values, summaries, permutation test, bootstrap."""

import json
import math
from fractions import Fraction
from itertools import product

import numpy as np
import overlap_reference as reference
import pytest

from analysis.overlap import jaccard, neurons_per_layer, overlap_statistics, pair_table
from analysis.significance import permutation_test

A = frozenset({(0, 1), (0, 2), (1, 3)})
B = frozenset({(0, 2), (1, 3), (2, 5)})

# Two relations x two facts. Jaccard over all layers, by hand:
#   intra: f1-f2 = 1/3, g1-g2 = 2/3            (intersections 1, 2)
#   inter: f1-g1 = 0, f1-g2 = 1/4, f2-g1 = 1/3, f2-g2 = 2/3   (intersections 0, 1, 1, 2)
TWO_BY_TWO = {
    "f1": frozenset({(0, 1), (0, 2)}),
    "f2": frozenset({(0, 1), (1, 4)}),
    "g1": frozenset({(1, 4), (1, 5)}),
    "g2": frozenset({(0, 1), (1, 4), (1, 5)}),
}
TWO_BY_TWO_RELATIONS = {"f1": "P1", "f2": "P1", "g1": "P2", "g2": "P2"}


def blocked_sets(n_relations, n_facts):
    """Identical sets within a relation, disjoint across relations."""
    sets, relations = {}, {}
    for r, k in product(range(n_relations), range(n_facts)):
        sets[f"r{r}_f{k}"] = frozenset({(r, 10 * r), (r, 10 * r + 1), (r + 1, 3)})
        relations[f"r{r}_f{k}"] = f"R{r}"
    return sets, relations


def random_sets(n_relations, n_facts, seed, n_layers=3, width=8, size=4):
    """Sets drawn independently of the relation."""
    rng = np.random.default_rng(seed)
    neurons = [(layer, i) for layer in range(n_layers) for i in range(width)]
    sets, relations = {}, {}
    for r, k in product(range(n_relations), range(n_facts)):
        chosen = rng.choice(len(neurons), size=size, replace=False)
        sets[f"r{r}_f{k}"] = frozenset(neurons[i] for i in chosen)
        relations[f"r{r}_f{k}"] = f"R{r}"
    return sets, relations


def reference_permutation_p(sets, relations, n_permutations, seed):
    """The permutation p-value in exact rational arithmetic, drawing the same permutations."""
    facts = list(sets)
    labels = [relations[f] for f in facts]
    pairs = [(i, j) for i in range(len(facts)) for j in range(i + 1, len(facts))]
    values = {
        (i, j): Fraction(len(sets[facts[i]] & sets[facts[j]]), len(sets[facts[i]] | sets[facts[j]]))
        for i, j in pairs
        if sets[facts[i]] | sets[facts[j]]
    }

    def statistic(labels):
        intra = [v for (i, j), v in values.items() if labels[i] == labels[j]]
        inter = [v for (i, j), v in values.items() if labels[i] != labels[j]]
        return sum(intra) / len(intra) - sum(inter) / len(inter) if intra and inter else None

    observed = statistic(labels)
    rng = np.random.default_rng(seed)
    null = [statistic([labels[k] for k in rng.permutation(len(facts))]) for _ in range(n_permutations)]
    return (1 + sum(v is None or v >= observed for v in null)) / (1 + n_permutations)


def assert_plain_json(obj):
    """Only Python ints, floats, bools, strings, None, lists and dicts; no NaN."""
    assert type(obj) in (int, float, bool, str, type(None), list, dict), type(obj)
    if isinstance(obj, float):
        assert math.isfinite(obj)
    if isinstance(obj, list):
        for x in obj:
            assert_plain_json(x)
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str)
            assert_plain_json(v)


# --- jaccard, pairs ------------------------------------------------------------------------------------


def test_jaccard_hand_made_sets():
    assert jaccard(A, B) == pytest.approx(2 / 4)
    assert jaccard(A, A) == 1.0
    assert jaccard({(0, 1)}, {(0, 2)}) == 0.0


def test_jaccard_empty_sets():
    assert jaccard(frozenset(), frozenset()) is None
    assert jaccard(frozenset(), A) == 0.0
    assert jaccard(A, set()) == 0.0


# --- pair_table, neurons_per_layer -----------------------------------------------------------------------


def test_pair_table_per_layer_values():
    (row,) = pair_table({"a": A, "b": B}, {"a": "P1", "b": "P2"}, n_layers=4)
    assert row["fact_a"] == "a" and row["fact_b"] == "b" and row["same_relation"] is False
    assert row["jaccard"] == pytest.approx(0.5)
    assert row["intersection"] == 2
    # layer 0: {(0,1),(0,2)} vs {(0,2)}; layer 1: {(1,3)} vs {(1,3)}; layer 2: {} vs {(2,5)};
    # layer 3: both empty
    assert row["jaccard_per_layer"] == [pytest.approx(0.5), 1.0, 0.0, None]
    assert row["intersection_per_layer"] == [1, 1, 0, 0]


def test_pair_table_rejects_layer_out_of_range():
    with pytest.raises(ValueError, match="layer outside"):
        pair_table({"a": A, "b": B}, {"a": "P1", "b": "P1"}, n_layers=2)


def test_neurons_per_layer_counts_shared_neurons_per_fact():
    assert neurons_per_layer({"a": A, "b": B}, n_layers=4) == [3, 2, 1, 0]
    assert neurons_per_layer(TWO_BY_TWO, n_layers=3) == [4, 5, 0]
    assert neurons_per_layer({}, n_layers=2) == [0, 0]


# --- summarize, overlap_statistics -----------------------------------------------------------------------


def test_reference_summarize_excludes_none_and_uses_population_std():
    s = reference.summarize([1.0, None, 3.0, None])
    assert s == {"pairs": 4, "defined": 2, "mean": 2.0, "std": 1.0}  # ddof=1 would give sqrt(2)
    assert reference.summarize([None, None]) == {"pairs": 2, "defined": 0, "mean": None, "std": None}
    assert reference.summarize([]) == {"pairs": 0, "defined": 0, "mean": None, "std": None}


def test_overlap_statistics_two_relations_by_hand():
    stats = overlap_statistics(TWO_BY_TWO, TWO_BY_TWO_RELATIONS, n_layers=3)
    intra, inter = stats["all_layers"]["intra"], stats["all_layers"]["inter"]

    assert intra["jaccard"] == {
        "pairs": 2,
        "defined": 2,
        "mean": pytest.approx(1 / 2),
        "std": pytest.approx(1 / 6),
    }
    assert intra["intersection"] == {"pairs": 2, "defined": 2, "mean": 1.5, "std": 0.5}
    # inter Jaccard in 48ths: 0, 12, 16, 32 -> mean 15/48;
    # squared deviations 225 + 9 + 1 + 289 = 524 -> variance 131/48^2
    assert inter["jaccard"]["pairs"] == 4
    assert inter["jaccard"]["mean"] == pytest.approx(5 / 16)
    assert inter["jaccard"]["std"] == pytest.approx(math.sqrt(131) / 48)
    assert inter["intersection"]["mean"] == 1.0
    assert inter["intersection"]["std"] == pytest.approx(math.sqrt(0.5))

    layer0, layer1, layer2 = stats["per_layer"]
    assert [layer0["layer"], layer1["layer"], layer2["layer"]] == [0, 1, 2]
    # layer 0 sets: f1 {(0,1),(0,2)}, f2 {(0,1)}, g1 {}, g2 {(0,1)}
    assert layer0["intra"]["jaccard"]["mean"] == pytest.approx((1 / 2 + 0) / 2)
    assert layer0["inter"]["jaccard"]["mean"] == pytest.approx((0 + 1 / 2 + 0 + 1) / 4)
    assert layer0["inter"]["intersection"]["mean"] == pytest.approx((0 + 1 + 0 + 1) / 4)
    # layer 1 sets: f1 {}, f2 {(1,4)}, g1 {(1,4),(1,5)}, g2 {(1,4),(1,5)}
    assert layer1["intra"]["jaccard"]["mean"] == pytest.approx((0 + 1) / 2)
    assert layer1["inter"]["jaccard"]["mean"] == pytest.approx((0 + 0 + 1 / 2 + 1 / 2) / 4)
    # layer 2 is empty everywhere: every Jaccard undefined, intersections 0
    assert layer2["intra"]["jaccard"] == {"pairs": 2, "defined": 0, "mean": None, "std": None}
    assert layer2["inter"]["jaccard"] == {"pairs": 4, "defined": 0, "mean": None, "std": None}
    assert layer2["inter"]["intersection"]["mean"] == 0.0

    assert len(stats["pairs"]) == 6
    assert sum(row["same_relation"] for row in stats["pairs"]) == 2


# --- permutation test ------------------------------------------------------------------------------------


def test_permutation_statistic_matches_hand_computation():
    result = permutation_test(TWO_BY_TWO, TWO_BY_TWO_RELATIONS, n_permutations=200, seed=1)
    assert result["statistic"] == pytest.approx(1 / 2 - 5 / 16)
    assert result["intra_mean"] == pytest.approx(1 / 2)
    assert result["inter_mean"] == pytest.approx(5 / 16)
    assert 0 < result["p_value"] <= 1
    assert result["alternative"] == "intra > inter"


def test_permutation_test_blocked_structure_gives_minimum_p():
    sets, relations = blocked_sets(4, 4)
    result = permutation_test(sets, relations, n_permutations=1000, seed=0)
    assert result["statistic"] == 1.0  # intra Jaccard all 1, inter all 0
    # Only relabellings that map each relation's block onto a block reach the statistic 1:
    # probability 4!^4 * 4! / 16! ~ 4e-7, so none of 1000 permutations does and p is the minimum 1/1001.
    assert math.factorial(4) ** 5 / math.factorial(16) < 1e-6
    assert result["p_value"] == 1 / 1001
    assert result["p_value"] <= 0.01


def test_permutation_test_counts_ties_as_extreme():
    # Two relations with two identical facts each: 2!*2!*2! = 8 of the 4! relabellings reproduce the
    # grouping (statistic equal to the observed one), so p is about 1/3, not the minimum.
    sets, relations = blocked_sets(2, 2)
    result = permutation_test(sets, relations, n_permutations=1000, seed=0)
    assert result["p_value"] > 0.2


def test_permutation_test_counts_ties_up_to_rounding():
    # J(f0,f1) = 1/10, J(f0,f2) = 3/10, J(f2,f3) = 1/5; the other pairs 0. Grouping {f0,f1|f2,f3}
    # and {f0,f2|f1,f3} both give intra mean 3/20 and inter mean 3/40, but in floats 0.1 + 0.2 != 0.3;
    # the third grouping {f0,f3|f1,f2} gives -3/20. So 2/3 of the relabellings tie with the observed one.
    def layer0(*indices):
        return frozenset((0, i) for i in indices)

    sets = {
        "f0": layer0(1, 2, 3, 4, 10, 11, 12, 13, 14),
        "f1": layer0(1, 20),
        "f2": layer0(2, 3, 4, 5),
        "f3": layer0(5, 30),
    }
    relations = {"f0": "A", "f1": "A", "f2": "B", "f3": "B"}
    assert [row["jaccard"] for row in pair_table(sets, relations, 1)] == [0.1, 0.3, 0.0, 0.0, 0.0, 0.2]
    result = permutation_test(sets, relations, n_permutations=1000, seed=0)
    assert result["p_value"] == reference_permutation_p(sets, relations, 1000, seed=0)
    assert result["p_value"] > 0.5


def test_permutation_test_matches_exact_reference():
    sets, relations = random_sets(3, 4, seed=5, width=4)
    result = permutation_test(sets, relations, n_permutations=500, seed=9)
    assert result["p_value"] == reference_permutation_p(sets, relations, 500, seed=9)


def test_permutation_test_undefined_relabelling_counts_as_extreme():
    # a, b identical (relation P1); c, d empty, each alone in its relation. A relabelling puts one of the
    # 6 pairs in the 2-fact group: {a,b} ties (statistic 1), {c,d} leaves no defined intra pair (counted
    # as extreme), the other 4 give a negative statistic. So p is about 2/6.
    sets = {"a": A, "b": A, "c": frozenset(), "d": frozenset()}
    relations = {"a": "P1", "b": "P1", "c": "P2", "d": "P3"}
    result = permutation_test(sets, relations, n_permutations=1000, seed=0)
    assert result["statistic"] == 1.0
    assert result["p_value"] == pytest.approx(1 / 3, abs=0.05)
    assert result["p_value"] == reference_permutation_p(sets, relations, 1000, seed=0)


def test_permutation_test_random_sets_not_significant():
    sets, relations = random_sets(4, 5, seed=123)
    assert permutation_test(sets, relations, n_permutations=1000, seed=0)["p_value"] > 0.05


def test_permutation_test_null_p_values_not_piled_near_zero():
    p_values = [permutation_test(*random_sets(3, 4, seed=s), n_permutations=200, seed=s)["p_value"] for s in range(20)]
    assert sum(p <= 0.05 for p in p_values) <= 4
    assert 0.25 < np.mean(p_values) < 0.75


def test_permutation_test_reproducible():
    sets, relations = random_sets(4, 5, seed=7)
    first = permutation_test(sets, relations, n_permutations=300, seed=11)
    assert permutation_test(sets, relations, n_permutations=300, seed=11) == first
    assert first["seed"] == 11 and first["n_permutations"] == 300


def test_permutation_test_excludes_undefined_pairs():
    sets = dict(TWO_BY_TWO, e1=frozenset(), e2=frozenset())
    relations = dict(TWO_BY_TWO_RELATIONS, e1="P3", e2="P3")
    # e1-e2 (intra) is undefined; the 8 pairs of an empty set with a non-empty one are inter with Jaccard 0
    result = permutation_test(sets, relations, n_permutations=100)
    assert result["intra_mean"] == pytest.approx(1 / 2)
    assert result["inter_mean"] == pytest.approx((15 / 48 * 4) / 12)


def test_permutation_test_without_intra_pairs_gives_note():
    result = permutation_test({"a": A, "b": B}, {"a": "P1", "b": "P2"})
    assert result["statistic"] is None and result["p_value"] is None
    assert "intra" in result["note"]
    result = permutation_test({"a": A, "b": B}, {"a": "P1", "b": "P1"})
    assert result["p_value"] is None and "inter" in result["note"]


# --- JSON ------------------------------------------------------------------------------------------------


def test_outputs_are_plain_json():
    sets = dict(TWO_BY_TWO, e1=frozenset())
    relations = dict(TWO_BY_TWO_RELATIONS, e1="P3")
    outputs = [
        overlap_statistics(sets, relations, n_layers=3),
        permutation_test(sets, relations, n_permutations=50),
        permutation_test({"a": A, "b": B}, {"a": "P1", "b": "P2"}),
        neurons_per_layer(sets, n_layers=3),
    ]
    for out in outputs:
        json.dumps(out, allow_nan=False)
        assert_plain_json(out)
