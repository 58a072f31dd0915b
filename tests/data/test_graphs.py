"""The shared k-NN graph builder: edge direction, per-slide construction, self loops, duplicates, tiny slides."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch_geometric.nn import MessagePassing

from benchmark.data.bag import Bag
from benchmark.data.graphs import bag_graph, build_graph, knn_edges


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class SumNeighbours(MessagePassing):
    """``out_i = sum_{(j -> i) in E} x_j`` with PyG's default source-to-target flow."""

    def __init__(self):
        super().__init__(aggr="add", flow="source_to_target")

    def forward(self, x, edge_index):
        return self.propagate(edge_index, x=x)


def brute_knn_sets(points: np.ndarray, k: int) -> list[set[int]]:
    d = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return [set(np.argsort(row, kind="stable")[:k].tolist()) for row in d]


def in_neighbour_sets(edges: np.ndarray, n: int) -> list[set[int]]:
    sets: list[set[int]] = [set() for _ in range(n)]
    for src, dst in edges.T:
        sets[dst].add(int(src))
    return sets


def test_node_aggregates_from_its_own_k_nearest_under_pyg_flow():
    rng = np.random.default_rng(0)
    points = rng.random((40, 2)) * 1000  # continuous: no distance ties
    k = 3
    edges = build_graph(points, np.zeros(40, dtype=np.int64), k=k)
    # One-hot node identities: row i of the sum is the indicator of the nodes i received messages from.
    received = SumNeighbours()(torch.eye(40), edges).numpy()
    expected = brute_knn_sets(points, k)
    for i in range(40):
        assert set(np.flatnonzero(received[i]).tolist()) == expected[i]
        assert received[i].sum() == k  # each neighbour exactly once


def test_direction_on_an_asymmetric_toy_graph():
    # On a line at 0, 1, 10 with k = 1: 0 <-> 1 are mutual nearest; 10's nearest is 1, but 1's nearest is 0.
    points = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    edges = build_graph(points, np.zeros(3, dtype=np.int64), k=1)
    x = torch.tensor([[1.0], [10.0], [100.0]])
    out = SumNeighbours()(x, edges).squeeze(1).tolist()
    assert out == [10.0, 1.0, 10.0]  # node 1 hears only from node 0, never from node 2


def test_regular_grid_interior_is_the_moore_neighbourhood():
    side = 7
    coords = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(-1, 2) * 256
    edges = build_graph(coords, np.zeros(len(coords), dtype=np.int64), k=8).numpy()
    sets = in_neighbour_sets(edges, len(coords))
    centre = 3 * side + 3
    moore = {(3 + dx) * side + 3 + dy for dx in (-1, 0, 1) for dy in (-1, 0, 1) if (dx, dy) != (0, 0)}
    assert sets[centre] == moore


def test_no_edges_between_slides_and_offsets_are_right():
    rng = np.random.default_rng(1)
    # Two slides with identical coordinates, rows interleaved in bag order: the closest point to every
    # patch (distance 0) lies on the other slide, so any leak would show.
    grid = rng.permutation(np.stack(np.meshgrid(np.arange(6), np.arange(5)), -1).reshape(-1, 2))
    coords = np.repeat(grid, 2, axis=0)
    slides = np.tile([0, 1], len(grid))
    edges = build_graph(torch.from_numpy(coords), torch.from_numpy(slides), k=8).numpy()
    assert (slides[edges[0]] == slides[edges[1]]).all()
    assert np.bincount(edges[1], minlength=len(coords)).tolist() == [8] * len(coords)
    # Within a slide, the graph equals the slide's own graph mapped back to bag rows.
    rows = np.flatnonzero(slides == 1)
    own = rows[knn_edges(coords[rows], 8)]
    mask = slides[edges[1]] == 1
    assert sorted(map(tuple, edges[:, mask].T)) == sorted(map(tuple, own.T))


def test_no_self_loops_and_duplicate_coordinates():
    base = np.array([[0, 0], [256, 0], [0, 256], [256, 256], [512, 512], [768, 0]])
    coords = np.concatenate([np.repeat(base[:1], 12, axis=0), base[1:]])  # 12 copies of one patch
    edges = build_graph(coords, np.zeros(len(coords), dtype=np.int64), k=8).numpy()
    assert (edges[0] != edges[1]).all()
    assert len(set(map(tuple, edges.T))) == edges.shape[1]  # no repeated edge
    assert np.bincount(edges[1], minlength=len(coords)).tolist() == [8] * len(coords)
    # A duplicated patch's neighbours are 8 of its 11 copies (distance 0), never a farther patch.
    for i in range(12):
        assert set(edges[0, edges[1] == i].tolist()) <= set(range(12)) - {i}


@pytest.mark.parametrize("method", ["kdtree", "brute"])
def test_duplicates_in_both_search_methods(method):
    pts = np.zeros((10, 3))
    edges = knn_edges(pts, 4, method=method)
    assert edges.shape == (2, 40)
    assert (edges[0] != edges[1]).all()


@pytest.mark.parametrize("n, k, per_node", [(0, 8, 0), (1, 8, 0), (2, 8, 1), (5, 8, 4), (9, 8, 8)])
def test_slides_with_at_most_k_patches(n, k, per_node):
    pts = np.arange(2 * n, dtype=np.float64).reshape(n, 2)
    edges = knn_edges(pts, k)
    assert edges.shape == (2, n * per_node) and edges.dtype == np.int64
    if n and per_node == n - 1:  # everyone is everyone's neighbour
        assert in_neighbour_sets(edges, n) == [set(range(n)) - {i} for i in range(n)]


def test_latent_graph_is_queried_with_features():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((60, 64)).astype(np.float32)
    edges = build_graph(torch.from_numpy(feats), torch.zeros(60, dtype=torch.long), k=8).numpy()
    assert in_neighbour_sets(edges, 60) == brute_knn_sets(feats.astype(np.float64), 8)


def test_kdtree_and_brute_force_agree():
    pts = np.random.default_rng(3).standard_normal((200, 5))
    a, b = knn_edges(pts, 8, method="kdtree"), knn_edges(pts, 8, method="brute")
    assert in_neighbour_sets(a, 200) == in_neighbour_sets(b, 200)


def test_bad_input_is_refused_clearly():
    with pytest.raises(ValueError, match="NaN or inf"):
        knn_edges(np.array([[0.0, 1.0], [np.nan, 2.0], [3.0, 4.0]]), 2)
    with pytest.raises(ValueError, match="shape"):
        build_graph(np.zeros((4, 2)), np.zeros(3), k=2)
    with pytest.raises(ValueError, match="k must be"):
        knn_edges(np.zeros((4, 2)), 0)


def _bag(n=30, with_coords=True, edge_index=None):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(n, 16, generator=g)
    coords = torch.randint(0, 50, (n, 2), generator=g) * 256
    slides = torch.tensor([0] * (n // 2) + [1] * (n - n // 2))
    return Bag(
        "patient-7",
        ("s0", "s1"),
        {20: feats},
        {20: coords} if with_coords else {},
        {20: slides},
        {} if edge_index is None else edge_index,
    )


def test_bag_graph_uses_the_cached_graph_or_builds_the_same():
    bag = _bag()
    built = bag_graph(bag, "spatial")
    assert torch.equal(built, build_graph(bag.coords[20], bag.slide_index[20], 8))
    cached = torch.tensor([[1], [0]])
    assert torch.equal(bag_graph(_bag(edge_index={"spatial": cached}), "spatial"), cached)
    assert torch.equal(bag_graph(bag, "latent"), build_graph(bag.features[20], bag.slide_index[20], 8))


def test_bag_graph_errors_name_the_bag():
    with pytest.raises(ValueError, match="patient-7.*coordinates"):
        bag_graph(_bag(with_coords=False), "spatial")
    with pytest.raises(ValueError, match="patient-7.*outside"):
        bag_graph(_bag(edge_index={"spatial": torch.tensor([[0], [30]])}), "spatial")
    with pytest.raises(ValueError, match="patient-7.*shape"):
        bag_graph(_bag(edge_index={"spatial": torch.tensor([0, 1])}), "spatial")
