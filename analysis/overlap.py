"""Overlap statistics for knowledge-neuron sets across facts, exact over every pair without a list of pairs.

Method:
- Jaccard similarity |A∩B| / |A∪B| (and the plain intersection size) between the refined
  knowledge-neuron sets of every unordered pair of facts, over all layers and layer by layer; pairs of
  facts from the same relation are "intra-relation", the others "inter-relation".
- The sets are a sparse fact x neuron incidence matrix X (scipy.sparse CSR, one column per neuron that
  occurs, grouped by layer). For a block of rows B the intersections are the sparse product X_B X^T;
  only pairs that share a neuron appear in it, and every other pair has intersection 0 and Jaccard 0
  (or undefined when both sets are empty, which the set sizes give). Each block is reduced at once to
  sums by relation pair (Jaccard, its square, intersection, its square), so memory and time grow with the
  facts and the pairs that share a neuron, never with a list of all pairs.
- Means and population standard deviations (ddof=0) of intra and inter pairs follow from those sums
  (variance as E[x²] - E[x]²); `relation_matrix` keeps them relation by relation.

A Jaccard value is undefined (None) when both sets are empty; undefined values are left out of means
and counted separately. Every result is made of Python ints, floats, None, lists and dicts, so it can be
written with `json.dumps(..., allow_nan=False)`. The significance tests are in `analysis.significance`.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse

from common.outputs import atomic_write

Neuron = tuple[int, int]

PAIRS_IN_JSON_MAX_FACTS = 300  # above this many facts `overlap.pairs` is left out (see --pairs-file)
BLOCK_ROWS = 1024  # rows of X per sparse product
_SUMS = ("jaccard", "jaccard_sq", "intersection", "intersection_sq")


def jaccard(a: AbstractSet[Neuron], b: AbstractSet[Neuron]) -> float | None:
    """|a∩b| / |a∪b|; None when both sets are empty (undefined)."""
    union = len(a | b)
    if union == 0:
        return None
    return len(a & b) / union


@dataclass(frozen=True)
class Incidence:
    """Neuron sets as sparse matrices. facts: ids in the input order; relations: the sorted relation ids;
    codes: (n_facts,) index of each fact's relation; full: (n_facts, n_columns) 0/1 CSR over every neuron that
    occurs; layers: per layer the CSR (n_facts, n_columns of that layer)."""

    facts: list[str]
    relations: list[str]
    codes: np.ndarray
    full: sparse.csr_matrix
    layers: list[sparse.csr_matrix]

    @property
    def sizes(self) -> np.ndarray:
        """(n_facts,) set sizes over all layers."""
        return np.diff(self.full.indptr).astype(float)


def incidence(sets: Mapping[str, AbstractSet[Neuron]], relations: Mapping[str, str],
              n_layers: int | None = None) -> Incidence:
    """The incidence matrices of `sets` (in their order). n_layers None: one more than the largest layer."""
    facts = list(sets)
    missing = [f for f in facts if f not in relations]
    if missing:
        raise ValueError(f"facts without a relation: {missing}")
    names, codes = np.unique(np.array([relations[f] for f in facts], dtype=object).astype(str), return_inverse=True)
    rows = np.repeat(np.arange(len(facts)), [len(sets[f]) for f in facts])
    neurons = np.array([n for f in facts for n in sets[f]], dtype=np.int64).reshape(-1, 2)
    depth = n_layers if n_layers is not None else int(neurons[:, 0].max() + 1) if len(neurons) else 0
    bad = (neurons[:, 0] < 0) | (neurons[:, 0] >= depth)
    if bad.any():
        layer, index = neurons[bad][0]
        raise ValueError(f"neuron ({layer}, {index}) has a layer outside [0, {depth})")
    stride = int(neurons[:, 1].max()) + 1 if len(neurons) else 1
    keys, columns = np.unique(neurons[:, 0] * stride + neurons[:, 1], return_inverse=True)  # sorted by layer
    layer_of_column = keys // stride
    full = sparse.csr_matrix((np.ones(len(rows)), (rows, columns.ravel())), shape=(len(facts), len(keys)))
    bounds = np.searchsorted(layer_of_column, np.arange(depth + 1))
    layers = [full[:, bounds[k]:bounds[k + 1]].tocsr() for k in range(depth)]
    return Incidence(facts, [str(n) for n in names], codes.ravel().astype(np.int64), full, layers)


def upper_entries(x: sparse.csr_matrix, block: int = BLOCK_ROWS) -> Iterator[tuple[np.ndarray, ...]]:
    """(rows, cols, intersections) of the pairs i < j whose sets share a neuron, one block of rows at a time
    (X_B X^T against the rows from the block's first on)."""
    n = x.shape[0]
    for start in range(0, n, block):
        stop = min(start + block, n)
        product = (x[start:stop] @ x[start:].T).tocoo()
        rows, cols = product.row.astype(np.int64) + start, product.col.astype(np.int64) + start
        keep = cols > rows
        yield rows[keep], cols[keep], product.data[keep]


def jaccard_entries(inc: Incidence, block: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, Jaccard) of every pair i < j with a nonzero Jaccard over all layers (the others are 0 or
    undefined); (nnz,) arrays, int64, int64, float64."""
    s = inc.sizes
    parts = [(r, c, v / (s[r] + s[c] - v)) for r, c, v in upper_entries(inc.full, block)]
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return tuple(np.concatenate(p) for p in zip(*parts, strict=True))


def _pair_counts(codes: np.ndarray, n_relations: int, members: np.ndarray) -> np.ndarray:
    """(R, R) number of unordered pairs of distinct facts among `members` (a boolean mask) by relation pair."""
    n = np.bincount(codes[members], minlength=n_relations).astype(np.int64)
    counts = np.outer(n, n)
    counts[np.diag_indices(n_relations)] = n * (n - 1) // 2
    return counts


def _fold(upper: np.ndarray) -> np.ndarray:
    """An (R, R) accumulator whose off-diagonal pair sums landed on either side, made symmetric."""
    diagonal = np.diag(upper).copy()
    folded = upper + upper.T
    folded[np.diag_indices(len(upper))] = diagonal
    return folded


def relation_sums(x: sparse.csr_matrix, codes: np.ndarray, n_relations: int, block: int = BLOCK_ROWS) -> dict:
    """Sums over pairs of facts by relation pair, each (R, R) and symmetric: "pairs", "defined" (Jaccard
    defined: not both sets empty), and the sums of Jaccard, Jaccard², intersection and intersection²."""
    s = np.diff(x.indptr).astype(float)
    acc = {k: np.zeros(n_relations * n_relations) for k in _SUMS}
    for rows, cols, inter in upper_entries(x, block):
        key = codes[rows] * n_relations + codes[cols]
        jac = inter / (s[rows] + s[cols] - inter)
        for name, values in zip(_SUMS, (jac, jac**2, inter, inter**2), strict=True):
            acc[name] += np.bincount(key, weights=values, minlength=n_relations * n_relations)
    everyone = np.ones(len(codes), bool)
    sums = {k: _fold(v.reshape(n_relations, n_relations)) for k, v in acc.items()}
    sums["pairs"] = _pair_counts(codes, n_relations, everyone)
    sums["defined"] = sums["pairs"] - _pair_counts(codes, n_relations, s == 0)
    return sums


def _summary(count: int, total: float, squares: float) -> dict:
    """Mean and population std from a count and the sums of the values and their squares (None when count 0)."""
    if count == 0:
        return {"mean": None, "std": None}
    mean = total / count
    return {"mean": float(mean), "std": float(np.sqrt(max(0.0, squares / count - mean * mean)))}


def _split(sums: dict) -> dict:
    """Intra (the diagonal) and inter (above it) summaries of Jaccard and intersection."""
    upper = np.triu(np.ones(sums["pairs"].shape, bool), k=1)
    out = {}
    for group, where in (("intra", np.eye(len(upper), dtype=bool)), ("inter", upper)):
        pairs, defined = int(sums["pairs"][where].sum()), int(sums["defined"][where].sum())
        total = {k: float(sums[k][where].sum()) for k in _SUMS}
        out[group] = {
            "jaccard": {"pairs": pairs, "defined": defined,
                        **_summary(defined, total["jaccard"], total["jaccard_sq"])},
            "intersection": {"pairs": pairs, "defined": pairs,
                             **_summary(pairs, total["intersection"], total["intersection_sq"])},
        }
    return out


def _means(total: np.ndarray, count: np.ndarray) -> list[list[float | None]]:
    """total / count element by element as nested lists, None where count is 0."""
    return [[float(t / c) if c else None for t, c in zip(tr, cr, strict=True)] for tr, cr in zip(total, count,
                                                                                                   strict=True)]


def overlap_from_incidence(inc: Incidence, block: int = BLOCK_ROWS) -> dict:
    """"all_layers", "per_layer" (intra / inter summaries) and "relation_matrix" of an incidence."""
    r = len(inc.relations)
    full = relation_sums(inc.full, inc.codes, r, block)
    layers = [relation_sums(x, inc.codes, r, block) for x in inc.layers]
    return {
        "all_layers": _split(full),
        "per_layer": [{"layer": k, **_split(s)} for k, s in enumerate(layers)],
        "relation_matrix": {
            "relations": inc.relations,
            "pairs": full["pairs"].tolist(),
            "jaccard": _means(full["jaccard"], full["defined"]),
            "intersection": _means(full["intersection"], full["pairs"]),
            "per_layer_jaccard": [_means(s["jaccard"], s["defined"]) for s in layers],
        },
    }


def iter_pair_rows(inc: Incidence, block: int = 256) -> Iterator[dict]:
    """One row per unordered pair of facts (i < j in the input order): Jaccard and intersection size over all
    layers and per layer. O(pairs): for small runs and the --pairs-file."""
    s_full = inc.sizes
    s_layers = [np.diff(x.indptr) for x in inc.layers]
    n = len(inc.facts)
    for start in range(0, n, block):
        stop = min(start + block, n)
        full = (inc.full[start:stop] @ inc.full.T).toarray()
        per_layer = [(x[start:stop] @ x.T).toarray() for x in inc.layers]
        for i in range(start, stop):
            for j in range(i + 1, n):
                inter = [int(p[i - start, j]) for p in per_layer]
                union = [int(s[i] + s[j]) - v for s, v in zip(s_layers, inter, strict=True)]
                both = int(full[i - start, j])
                whole = int(s_full[i] + s_full[j]) - both
                yield {
                    "fact_a": inc.facts[i],
                    "fact_b": inc.facts[j],
                    "same_relation": bool(inc.codes[i] == inc.codes[j]),
                    "jaccard": both / whole if whole else None,
                    "intersection": both,
                    "jaccard_per_layer": [v / u if u else None for v, u in zip(inter, union, strict=True)],
                    "intersection_per_layer": inter,
                }


def pair_table(sets: Mapping[str, AbstractSet[Neuron]], relations: Mapping[str, str], n_layers: int) -> list[dict]:
    """Every row of `iter_pair_rows` as a list (small runs only: it grows with the square of the facts)."""
    return list(iter_pair_rows(incidence(sets, relations, n_layers)))


def write_pairs_file(inc: Incidence, path: str | Path) -> Path:
    """The pair rows as gzip-compressed JSON lines, streamed block by block and written atomically."""
    def write(f) -> None:
        with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=6) as z:
            for row in iter_pair_rows(inc):
                z.write((json.dumps(row, allow_nan=False) + "\n").encode())

    atomic_write(Path(path), write)
    return Path(path)


def overlap_statistics(sets: Mapping[str, AbstractSet[Neuron]], relations: Mapping[str, str], n_layers: int,
                       max_pairs_facts: int = PAIRS_IN_JSON_MAX_FACTS) -> dict:
    """Intra- vs inter-relation overlap summaries over all layers and per layer, the relation x relation
    matrix, and the pair table when there are at most `max_pairs_facts` facts (else "pairs" is None and
    "pairs_omitted" says why)."""
    inc = incidence(sets, relations, n_layers)
    stats = overlap_from_incidence(inc)
    n = len(inc.facts)
    if n <= max_pairs_facts:
        stats["pairs"] = list(iter_pair_rows(inc))
    else:
        stats["pairs"] = None
        stats["pairs_omitted"] = (f"{n} facts ({n * (n - 1) // 2} pairs) is more than {max_pairs_facts}: the pair "
                                  "table is left out of the JSON; --pairs-file writes it to "
                                  "<label>_overlap_pairs.jsonl.gz")
    return stats


def neurons_per_layer(sets: Mapping[str, AbstractSet[Neuron]], n_layers: int) -> list[int]:
    """Number of knowledge neurons in each layer, summed over facts (a shared neuron counts per fact)."""
    counts = [0] * n_layers
    for neurons in sets.values():
        for layer, index in neurons:
            if not 0 <= layer < n_layers:
                raise ValueError(f"neuron ({layer}, {index}) has a layer outside [0, {n_layers})")
            counts[layer] += 1
    return counts
