"""Near-duplicate clusters: connected components of the verified pairs, one survivor each.

The graph is small next to the corpus (only documents that have a verified near-duplicate, and
the pairs between them), so it is clustered on the driver, vectorized with numpy, in memory
proportional to the number of pairs and of the documents they touch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def union_find(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Component label of every node of the graph on ``0..n-1`` with edges ``(a[k], b[k])``.

    The label is the smallest node of the component. Vectorized union-find: each round hooks the
    larger root of every edge whose ends lie in different trees under the smallest root it meets,
    then compresses paths by pointer jumping; parents only ever point to smaller nodes, so there
    are no cycles, and rounds stop when every edge lies inside one tree.
    """
    parent = np.arange(n, dtype=np.int64)
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    while True:
        while True:  # pointer jumping until every node points at its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
        ra, rb = parent[a], parent[b]
        apart = ra != rb
        if not apart.any():
            return parent
        a, b = a[apart], b[apart]  # edges already inside a tree never matter again
        np.minimum.at(parent, np.maximum(ra[apart], rb[apart]), np.minimum(ra[apart], rb[apart]))


@dataclass(frozen=True)
class Forest:
    """One tree per connected component, rooted at its survivor.

    ``root[i]`` is the component's survivor, ``parent[i]`` a neighbour of ``i`` one step closer to
    it (-1 for roots) and ``weight[i]`` the similarity of that pair (NaN for roots).
    """

    root: np.ndarray
    parent: np.ndarray
    weight: np.ndarray


def spanning_forest(n: int, a: np.ndarray, b: np.ndarray, weight: np.ndarray) -> Forest:
    """Cluster the graph and give every non-survivor a neighbour that leads to its survivor.

    Nodes must be numbered in survivor-preference order (0 = the best document), so the smallest
    node of each component (``union_find``'s label) is its survivor. A breadth-first search from
    all survivors at once then links each other member to a neighbour it was actually compared
    with, as few hops from the survivor as possible (ties: the best-ranked neighbour): following
    those links always ends at the kept document, and most members link to it directly.
    """
    root = union_find(n, a, b)
    tail = np.concatenate([a, b]).astype(np.int64)
    head = np.concatenate([b, a]).astype(np.int64)
    weights = np.concatenate([weight, weight]).astype(np.float64)
    parent = np.full(n, -1, dtype=np.int64)
    via = np.full(n, np.nan)
    reached = root == np.arange(n)
    frontier = reached.copy()
    while True:
        step = frontier[tail] & ~reached[head]
        if not step.any():
            break
        order = np.lexsort((tail[step], head[step]))  # by new node, then best-ranked neighbour
        new, first = np.unique(head[step][order], return_index=True)
        parent[new] = tail[step][order][first]
        via[new] = weights[step][order][first]
        reached[new] = True
        frontier = np.zeros(n, dtype=bool)
        frontier[new] = True
        keep = ~(reached[tail] & reached[head])  # edges between reached nodes are done
        tail, head, weights = tail[keep], head[keep], weights[keep]
    return Forest(root=root, parent=parent, weight=via)
