"""Pseudo-labels smoothed over the starting encoder's neighbourhoods: the graph and memory on synthetic
clusters, what the run may read (never the pool's labels, never the test set), exact resume."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from fewshot.errors import UserError
from fewshot.semisup import prepare_model, semisup_data, train_semisup
from fewshot.semisup.fixmatch import PseudoLabeler
from fewshot.semisup.job import run_semisup
from fewshot.semisup.loop import SemisupTrainer
from fewshot.semisup.neighbours import NeighbourSmoother
from tests.encoders import same_weights, tiny_encoder, write_checkpoint
from tests.test_semisup import _without_timing, interrupted_at_step_6, killed_at_step_6, tiny


def clusters(n_per_class: int = 30, n_classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, 8, generator=generator) * 3
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    return centres[labels] + 0.2 * torch.randn(labels.shape[0], 8, generator=generator), labels


def smoother_on_clusters(alpha: float = 0.9) -> tuple[NeighbourSmoother, torch.Tensor, int]:
    """Pool: every cluster point but the first two of each class, which are the labeled images (last rows)."""
    features, labels = clusters()
    labeled = torch.tensor([0, 1, 30, 31, 60, 61])
    pool = torch.tensor([i for i in range(features.shape[0]) if i not in set(labeled.tolist())])
    ordered = torch.cat([features[pool], features[labeled]])
    return NeighbourSmoother.from_features(ordered, pool.shape[0], labels[labeled], k=5, alpha=alpha), labels[pool], 84


def test_memory_starts_from_propagated_labels_and_keeps_the_labeled_one_hot() -> None:
    smoother, pool_labels, n_pool = smoother_on_clusters()
    assert smoother.memory.shape == (n_pool + 6, 10) and smoother.neighbours.shape == (n_pool, 5)
    assert torch.equal(smoother.memory[:n_pool].argmax(1), pool_labels)  # propagation found every cluster
    torch.testing.assert_close(smoother.memory[n_pool:], F.one_hot(torch.tensor([0, 0, 1, 1, 2, 2]), 10).float())
    torch.testing.assert_close(smoother.weights.sum(1), torch.ones(n_pool))
    assert not (smoother.neighbours == torch.arange(n_pool).unsqueeze(1)).any()  # no image is its own neighbour


def says_one(n: int) -> torch.Tensor:
    """Class distributions at 0.96 for class 1, the rest spread evenly."""
    probs = torch.full((n, 10), 0.04 / 9)
    probs[:, 1] = 0.96
    return probs


def test_a_prediction_its_neighbours_disagree_with_loses_confidence_and_is_remembered() -> None:
    smoother, pool_labels, _ = smoother_on_clusters()
    positions = torch.tensor([3, 40])  # class 0 and class 1 images
    confident_wrong = says_one(2)
    targets = smoother(confident_wrong, positions)
    torch.testing.assert_close(targets.sum(1), torch.ones(2))
    assert pool_labels[3] == 0 and pool_labels[40] == 1
    assert targets[0, 1] < 0.96 - 0.05 and targets[0, 0] > 0.05  # its neighbours say 0: pulled towards them
    assert targets[1, 1] > 0.96  # its neighbours agree: more confident
    assert torch.equal(smoother.memory[positions], targets)
    again = smoother(confident_wrong, positions)
    torch.testing.assert_close(again, targets)  # its own memory is not among its neighbours


def test_alpha_one_leaves_predictions_as_they_are() -> None:
    smoother, _, _ = smoother_on_clusters(alpha=1.0)
    probs = torch.softmax(torch.randn(4, 10, generator=torch.Generator().manual_seed(0)), dim=1)
    torch.testing.assert_close(smoother(probs, torch.tensor([0, 5, 9, 70])), probs)
    with pytest.raises(ValueError, match="alpha"):
        NeighbourSmoother(smoother.neighbours, smoother.weights, smoother.memory, alpha=0.0)


def test_the_labeler_thresholds_the_smoothed_targets() -> None:
    smoother, _, n_pool = smoother_on_clusters()
    cfg = tiny(threshold="fixed", dist_align=False, tau=0.9)
    labeler = PseudoLabeler(cfg, torch.full((10,), 0.1), n_pool, torch.device("cpu"))
    labeler.smoother = smoother
    logits = says_one(1).log()
    plain = PseudoLabeler(cfg, torch.full((10,), 0.1), n_pool, torch.device("cpu"))(logits, torch.tensor([3]))
    smoothed = labeler(logits, torch.tensor([3]))
    assert plain.mask.item() == 1.0 and smoothed.mask.item() == 0.0  # 0.96 passes 0.9; smoothed it does not


def test_the_graph_reads_neither_the_pools_labels_nor_the_test_images(mnist, draw) -> None:
    cfg = tiny(steps=6, graph_k=4)

    def train(data):
        return train_semisup(cfg, data, prepare_model(cfg, data, None))

    reference = train(semisup_data(mnist, draw, "cpu"))
    hidden = semisup_data(mnist, draw, "cpu")
    hidden.pool_labels = None
    hidden.x_test = torch.rand_like(hidden.x_test)  # other test images: the graph and training must not move
    other = train(hidden)
    assert same_weights(reference.online, other.online) and same_weights(reference.model, other.model)
    built = SemisupTrainer(cfg, hidden, prepare_model(cfg, hidden, None)).labeler.smoother
    assert built is not None and built.memory.shape[0] == hidden.pool.shape[0] + 100  # pool + all labels (refit)


def test_resume_with_the_graph_reproduces_the_uninterrupted_run(mnist, draw, tmp_path: Path) -> None:
    cfg = tiny(graph_k=4)
    data = semisup_data(mnist, draw, "cpu")
    reference = train_semisup(cfg, data, prepare_model(cfg, data, None))
    plain = train_semisup(replace(cfg, graph_k=0), data, prepare_model(cfg, data, None))
    assert not same_weights(reference.online, plain.online)  # the smoothing changed training
    path = tmp_path / "last.pt"
    state = interrupted_at_step_6(cfg, data, path)
    assert state["labeler"]["smoother"]["memory"].shape[0] == data.pool.shape[0] + 100
    resumed = train_semisup(cfg, data, prepare_model(cfg, data, None), checkpoint_path=path, resume_state=state)
    assert same_weights(resumed.online, reference.online) and same_weights(resumed.model, reference.model)
    assert _without_timing(resumed.history) == _without_timing(reference.history)
    with pytest.raises(UserError, match="graph_k 4 -> 0"):
        train_semisup(replace(cfg, graph_k=0), data, prepare_model(cfg, data, None), resume_state=state)
    older = interrupted_at_step_6(replace(cfg, graph_k=0), data, tmp_path / "older.pt")
    del older["config"]["graph_k"]  # as checkpoints were written before --graph-k existed
    with pytest.raises(UserError, match="made without --graph-k"):
        train_semisup(cfg, data, prepare_model(cfg, data, None), resume_state=older)


def test_tracked_run_with_the_graph_resumes_in_the_same_mlflow_run(
    synthetic_data_dir: Path, tracking_store: str, tmp_path: Path
) -> None:
    checkpoint = write_checkpoint(tmp_path / "moco.pt", tiny_encoder(seed=2))
    cfg = tiny(init=str(checkpoint), data_dir=str(synthetic_data_dir), graph_k=4, tta_views=0)
    with pytest.raises(KeyboardInterrupt):
        run_semisup(cfg, checkpoint_dir=tmp_path / "ck", run_name="graph", on_eval=killed_at_step_6, register=False)
    out = run_semisup(cfg, checkpoint_dir=tmp_path / "ck", run_name="graph", register=False)
    uninterrupted = run_semisup(cfg, checkpoint_dir=tmp_path / "ck2", run_name="graph-whole", register=False)
    run = MlflowClient().get_run(out["run_id"])
    assert run.data.tags["resumed_from_step"] == "3" and run.data.params["graph_k"] == "4"
    assert out["test_top1"] == uninterrupted["test_top1"] and out["val_top1"] == uninterrupted["val_top1"]


def test_bad_graph_settings_are_refused_naming_the_option() -> None:
    for change, option in (({"graph_k": 101}, "--graph-k"), ({"graph_alpha": 0.0}, "--graph-alpha")):
        with pytest.raises(UserError, match=option):
            tiny(**change).validate()
