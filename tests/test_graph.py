"""Label propagation on small synthetic embeddings: clusters, a chain, and the errors it raises."""

from __future__ import annotations

import pytest
import torch

from fewshot.graph import knn_graph, propagate, propagation_matrix


def clusters(n_per_class: int = 60, n_classes: int = 4, dim: int = 16, spread: float = 0.15, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=generator) * 3
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    features = centres[labels] + spread * torch.randn(labels.shape[0], dim, generator=generator)
    return features, labels


def test_knn_graph_excludes_self_and_matches_brute_force():
    features, _ = clusters()
    graph = knn_graph(features, k=5, chunk=17)  # a chunk that does not divide N
    unit = torch.nn.functional.normalize(features, dim=1)
    sims = unit @ unit.T
    sims.fill_diagonal_(-2)
    expected = sims.topk(5, dim=1)
    assert graph.k == 5
    assert not (graph.indices == torch.arange(features.shape[0]).unsqueeze(1)).any()
    torch.testing.assert_close(graph.similarities, expected.values)
    assert torch.equal(graph.indices, expected.indices)


def test_propagation_matrix_is_symmetric_and_normalised():
    features, _ = clusters()
    matrix = propagation_matrix(knn_graph(features, k=6)).to_dense()
    torch.testing.assert_close(matrix, matrix.T)
    assert (matrix >= 0).all()
    # D^-1/2 W D^-1/2 has spectral radius 1: the largest eigenvalue is 1
    assert torch.linalg.eigvalsh(matrix).max().item() == pytest.approx(1.0, abs=1e-4)


def test_one_seed_per_cluster_labels_every_cluster():
    features, labels = clusters()
    seeds = torch.tensor([0, 60, 120, 180])  # one image of each class
    result = propagate(propagation_matrix(knn_graph(features, k=8)), seeds, labels[seeds], n_classes=4)
    assert torch.equal(result.predictions, labels)
    torch.testing.assert_close(result.probs.sum(dim=1), torch.ones(labels.shape[0]))
    assert (result.certainty > 0).all() and (result.certainty <= 1).all()


def test_labels_travel_along_a_chain_and_certainty_falls_with_distance():
    # points on a line: each one's neighbours are the points next to it, so the label must walk
    x = torch.linspace(0, 1, 40)
    features = torch.stack([torch.cos(x), torch.sin(x)], dim=1)
    seeds, seed_labels = torch.tensor([0, 39]), torch.tensor([0, 1])
    result = propagate(propagation_matrix(knn_graph(features, k=2)), seeds, seed_labels, n_classes=2, iterations=200)
    assert (result.predictions[:15] == 0).all() and (result.predictions[25:] == 1).all()
    assert result.certainty[1] > result.certainty[10] > result.certainty[19]


def test_unreached_nodes_are_uniform_with_zero_certainty():
    # two far-apart groups; seeds only in the first: the second group is never reached
    near = torch.randn(10, 3, generator=torch.Generator().manual_seed(1)) * 0.1 + torch.tensor([5.0, 0, 0])
    far = torch.randn(10, 3, generator=torch.Generator().manual_seed(2)) * 0.1 + torch.tensor([0, 0, -5.0])
    features = torch.cat([near, far])
    result = propagate(propagation_matrix(knn_graph(features, k=3)), torch.tensor([0]), torch.tensor([1]), 3)
    assert (result.predictions[:10] == 1).all()
    torch.testing.assert_close(result.probs[10:], torch.full((10, 3), 1 / 3))
    assert (result.certainty[10:] == 0).all()


def test_bad_settings_are_refused():
    features, labels = clusters(n_per_class=3)
    with pytest.raises(ValueError, match="k must be between"):
        knn_graph(features, k=features.shape[0])
    matrix = propagation_matrix(knn_graph(features, k=2))
    with pytest.raises(ValueError, match="alpha"):
        propagate(matrix, torch.tensor([0]), labels[:1], 4, alpha=1.0)
