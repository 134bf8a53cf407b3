"""Cluster statistics (EMA), cosine graph, Laplacian, cluster/domain agreement (docs/design.md sections 2.3, 2.6)."""

import math

import numpy as np
import pytest
import torch

from dograph.method.graph import ClusterStatistics, cluster_domain_agreement, cosine_adjacency, laplacian

# step 1: cluster 0 gets (1, 0) and (3, 0), cluster 1 gets (0, 2), cluster 2 is absent
STEP1 = (
    torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]]),
    torch.tensor([0, 1, 0]),
    torch.tensor([1.0, 4.0, 3.0]),
)
# step 2: cluster 0 gets (0, 0); cluster 2 gets (2, 2) and (4, 2); cluster 1 is absent
STEP2 = (
    torch.tensor([[2.0, 2.0], [0.0, 0.0], [4.0, 2.0]]),
    torch.tensor([2, 0, 2]),
    torch.tensor([6.0, 5.0, 8.0]),
)


def test_ema_on_a_hand_computed_two_step_example():
    stats = ClusterStatistics(3, 2, beta=0.9)
    stats.update(*STEP1)
    # first observation initialises (no decay from zero)
    assert stats.counts.tolist() == [2.0, 1.0, 0.0]
    assert torch.equal(stats.means, torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]]))
    assert stats.variances.tolist() == [2.0, 0.0, 0.0]  # unbiased; a singleton leaves it unknown
    assert stats.variance_known.tolist() == [True, False, False]
    assert stats.losses.tolist() == [2.0, 4.0, 0.0]
    assert stats.active.tolist() == [True, True, False]
    stats.update(*STEP2)
    assert stats.batch_counts.tolist() == [1, 0, 2]
    # cluster 0 seen twice: EMA; cluster 1 absent: keeps stats, count decays; cluster 2: first sight
    assert torch.allclose(stats.counts, torch.tensor([0.9 * 2 + 0.1 * 1, 0.9 * 1, 2.0]))
    assert torch.allclose(stats.means, torch.tensor([[0.9 * 2.0, 0.0], [0.0, 2.0], [3.0, 2.0]]))
    assert torch.allclose(stats.variances, torch.tensor([2.0, 0.0, 2.0]))  # one sample: no update
    assert torch.allclose(stats.losses, torch.tensor([0.9 * 2.0 + 0.1 * 5.0, 4.0, 7.0]))
    assert stats.active.tolist() == [True, True, True]


def test_absent_cluster_keeps_statistics_while_its_count_decays():
    stats = ClusterStatistics(2, 3, beta=0.8)
    g = torch.Generator().manual_seed(0)
    stats.update(torch.randn(6, 3, generator=g), torch.tensor([0, 1, 0, 1, 1, 0]), torch.rand(6, generator=g))
    kept = (stats.means[1].clone(), stats.variances[1].clone(), stats.losses[1].clone())
    for step in range(1, 4):
        stats.update(
            torch.randn(4, 3, generator=g), torch.zeros(4, dtype=torch.int64), torch.rand(4, generator=g)
        )
        assert stats.counts[1].item() == pytest.approx(3.0 * 0.8**step)
        assert torch.equal(stats.means[1], kept[0])
        assert torch.equal(stats.variances[1], kept[1]) and torch.equal(stats.losses[1], kept[2])
        assert stats.batch_counts.tolist() == [4, 0]


def test_variance_of_identical_points_is_zero():
    stats = ClusterStatistics(2, 4)
    point = torch.tensor([0.1, -0.3, 0.7, 1e3])
    stats.update(point.repeat(5, 1), torch.tensor([1, 1, 1, 1, 1]), torch.ones(5))
    assert stats.variances[1].item() == pytest.approx(0.0, abs=1e-6)
    assert torch.allclose(stats.means[1], point)


def test_state_dict_round_trip_and_reset():
    a = ClusterStatistics(3, 2, beta=0.9)
    a.update(*STEP1)
    a.update(*STEP2)
    b = ClusterStatistics(3, 2, beta=0.5)
    b.load_state_dict(a.state_dict())
    assert b.beta == 0.9
    for s in (a, b):
        s.update(torch.tensor([[1.0, 1.0]]), torch.tensor([1]), torch.tensor([2.0]))
    for name in ("counts", "means", "variances", "losses", "active", "variance_known", "batch_counts"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    a.reset()
    assert not a.active.any() and a.counts.sum().item() == 0.0
    with pytest.raises(ValueError, match="expected"):
        ClusterStatistics(4, 2).load_state_dict(b.state_dict())


def test_update_rejects_bad_shapes():
    with pytest.raises(ValueError, match="proj"):
        ClusterStatistics(3, 2).update(torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64), torch.zeros(4))


def test_adjacency_on_a_hand_computed_example():
    means = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0], [0.0, 5.0]])
    adj = cosine_adjacency(means, torch.tensor([True, True, True, False]))
    c = 1 / math.sqrt(2)
    expected = torch.tensor([[0.0, c, 0.0, 0.0], [c, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0] * 4])
    assert torch.allclose(adj, expected)


def test_adjacency_and_laplacian_properties():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(9, 16, generator=g)
    active = torch.ones(9, dtype=torch.bool)
    active[4] = False
    adj = cosine_adjacency(means, active)
    assert torch.equal(adj, adj.T)
    assert (adj >= 0).all() and (adj <= 1).all() and (adj > 0).any()
    assert (adj.diagonal() == 0).all() and (adj[4] == 0).all() and (adj[:, 4] == 0).all()
    lap = laplacian(adj)
    assert torch.allclose(lap.sum(1), torch.zeros(9), atol=1e-6)
    assert torch.linalg.eigvalsh(lap.double()).min() > -1e-6
    w = torch.rand(9, generator=g)
    smooth = 0.5 * (adj * (w[:, None] - w[None, :]) ** 2).sum()
    assert torch.allclose(w @ lap @ w, smooth, atol=1e-5)


def test_zero_norm_means_give_no_nan():
    means = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.1]])
    adj = cosine_adjacency(means, torch.ones(3, dtype=torch.bool))
    assert torch.isfinite(adj).all() and (adj[0] == 0).all() and (adj[:, 0] == 0).all()
    assert adj[1, 2] > 0.99
    assert torch.isfinite(laplacian(adj)).all()


def test_agreement_perfect_labelling_and_table():
    domain = np.array([0, 0, 1, 1, 1, 2, -1, -1])
    assign = np.array([3, 3, 0, 0, 0, 1, 2, 0])  # a relabelling; unlabelled rows ignored
    out = cluster_domain_agreement(assign, domain, num_clusters=4, num_domains=3)
    assert out.ari == pytest.approx(1.0) and out.nmi == pytest.approx(1.0)
    assert out.num_labelled == 6
    expected = np.zeros((4, 3), dtype=np.int64)
    expected[3, 0], expected[0, 1], expected[1, 2] = 2, 3, 1
    assert np.array_equal(out.table, expected)


def test_agreement_mixed_labelling_with_tensors():
    assign = torch.tensor([0, 0, 1, 1])
    domain = torch.tensor([0, 1, 0, 1])
    out = cluster_domain_agreement(assign, domain, num_clusters=2, num_domains=2)
    assert out.table.tolist() == [[1, 1], [1, 1]]
    assert out.ari < 0 and out.nmi == pytest.approx(0.0, abs=1e-12)


def test_agreement_edge_cases():
    out = cluster_domain_agreement([0, 1], [-1, -1], num_clusters=2, num_domains=3)
    assert out.num_labelled == 0 and math.isnan(out.ari) and out.table.sum() == 0
    with pytest.raises(ValueError, match="domain ids"):
        cluster_domain_agreement([0, 1], [0, 3], num_clusters=2, num_domains=3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_on_cuda_does_not_sync():
    stats = ClusterStatistics(4, 8)
    proj, assign, loss = torch.randn(16, 8).cuda(), torch.randint(0, 4, (16,)).cuda(), torch.rand(16).cuda()
    stats.update(proj, assign, loss)  # first call moves the statistics to the inputs' device
    torch.cuda.set_sync_debug_mode("error")
    try:
        stats.update(proj, assign, loss)
        adj = cosine_adjacency(stats.means, stats.active)
        laplacian(adj)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert stats.counts.is_cuda
