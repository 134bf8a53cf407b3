"""KMeansClusterer: recovery, warm starts with stable ids, edge cases (docs/design.md sections 2.2, 5, 6)."""

import logging

import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from dograph.method.clustering import (
    KMeansClusterer,
    _left_their_region,
    match_centroids,
    matching_permutation,
    squared_distances,
)


def blobs(n=600, dim=32, k=4, sep=8.0, seed=0, centres=None):
    """Gaussian blobs (noise 0.3 per coordinate), centres ``sep`` apart on average, unequal sizes."""
    g = torch.Generator().manual_seed(seed)
    if centres is None:
        centres = torch.randn(k, dim, generator=g) * sep / (2 * dim) ** 0.5
    probs = torch.linspace(1.0, 3.0, k)
    labels = torch.multinomial(probs, n, replacement=True, generator=g)
    return centres[labels] + 0.3 * torch.randn(n, dim, generator=g), labels, centres


def test_recovers_well_separated_blobs():
    x, labels, _ = blobs(k=5)
    km = KMeansClusterer(5, seed=3)
    refresh = km.fit(x)
    assert adjusted_rand_score(labels.numpy(), km.assign(x).numpy()) > 0.99
    assert refresh.drift == 0.0 and not refresh.warm_started
    assert refresh.num_points == 600 and refresh.empty_clusters == 0
    assert refresh.backend == "faiss-cpu" or torch.cuda.is_available()


def test_same_seed_gives_identical_centroids():
    x, _, _ = blobs(n=800, k=6, sep=3.0)
    a, b = KMeansClusterer(6, seed=11), KMeansClusterer(6, seed=11)
    assert torch.equal(a.fit(x).centroids, b.fit(x).centroids)
    x2 = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.fit(x2).centroids, b.fit(x2).centroids)  # warm fits too


def test_warm_start_keeps_ids_when_data_moves_slightly():
    x, _, _ = blobs(k=4)
    km = KMeansClusterer(4, seed=0)
    old = km.fit(x).centroids
    before = km.assign(x)
    x2 = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    refresh = km.fit(x2)
    assert refresh.warm_started
    assert torch.equal(km.assign(x2), before)
    assert 0.0 < refresh.drift < 0.1
    assert refresh.reseeded == () and refresh.vanished == ()  # nothing moved region: statistics stay
    assert torch.allclose(refresh.centroids, old, atol=0.1)


def test_ids_follow_the_previous_centroids_whatever_their_order():
    """Permuting the previous centroids permutes the returned ids the same way, for warm
    and cold refits alike (Hungarian matching, not FAISS's output order, decides ids)."""
    x, _, _ = blobs(k=4)
    km = KMeansClusterer(4, seed=0)
    base = km.fit(x).centroids
    perm = torch.tensor([2, 0, 3, 1])
    x2 = x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    for warm in (True, False):
        km.load_state_dict({"centroids": base[perm], "num_fits": 1, "seed": 0})
        refresh = km.fit(x2, warm_start=warm)
        assert refresh.warm_started == warm
        assert torch.allclose(refresh.centroids, base[perm], atol=0.1)


def test_vanished_region_is_reported_reseeded():
    """Issue 15: blob 3 leaves the buffer and blob 1 turns bimodal. FAISS's first warm
    iteration finds id 2 empty and splits a cluster into it itself, so nothing is empty
    after ``train``; the id that moved must still be reported (its statistics are blob 3's)."""
    g = torch.Generator().manual_seed(0)
    centres = 10.0 * torch.eye(16)[:3]

    def blob(centre, n=200):
        return centre + 0.3 * torch.randn(n, 16, generator=g)

    km = KMeansClusterer(3, seed=0)
    old = km.fit(torch.cat([blob(c) for c in centres])).centroids
    assert torch.cdist(old, centres).argmin(1).tolist() == [0, 1, 2]
    off = 3.0 * torch.eye(16)[3]
    refresh = km.fit(torch.cat([blob(centres[0] + off), blob(centres[0] - off), blob(centres[1])]))
    assert refresh.warm_started and refresh.empty_clusters == 0  # FAISS left nothing empty
    moved = torch.cdist(refresh.centroids, old).argmin(1) != torch.arange(3)
    assert moved.tolist() == [False, False, True]  # id 2 now sits on blob 1
    assert refresh.vanished == (2,) and refresh.reseeded == (2,)  # ids after matching; 0 and 1 keep theirs


def test_ids_whose_matched_centroid_left_their_region_are_reseeded():
    """Hungarian matching after a split can chain: old A=0, B=10, C=11; C vanishes and A
    splits. Matching gives C's id B's centroid and B's id half of A, so both B's and C's
    statistics describe another region; A's id keeps its own."""
    prev = torch.tensor([[0.0], [10.0], [11.0]])
    new = torch.tensor([[-0.01], [10.0], [0.01]])  # FAISS order: A, B, split of A into C's slot
    matched = new[matching_permutation(prev, new)]
    assert matched.flatten().tolist() == pytest.approx([-0.01, 0.01, 10.0])
    assert _left_their_region(prev, matched).tolist() == [False, True, True]
    assert not _left_their_region(prev, prev + 0.4).any()


def test_match_centroids_undoes_a_permutation():
    old = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(1))
    noise = 1e-3 * torch.randn(7, 16, generator=torch.Generator().manual_seed(2))
    matched, drift = match_centroids(old, old[perm] + noise)
    assert torch.allclose(matched, old + noise[torch.argsort(perm)])
    assert drift == pytest.approx(noise.norm(dim=1).mean().item(), rel=1e-5)


def test_warm_objective_close_to_a_cold_fit():
    """The next refresh sees fresh samples from slightly moved clusters (docs/design.md section 5: warm
    starts must keep quality): warm objective within 1% of restarts from scratch."""
    x, _, centres = blobs(n=2000, dim=64, k=6, sep=3.0)
    km = KMeansClusterer(6, seed=0)
    km.fit(x)
    moved = centres + 0.05 * torch.randn(centres.shape, generator=torch.Generator().manual_seed(5))
    x2, _, _ = blobs(n=2000, dim=64, k=6, seed=1, centres=moved)
    warm = km.fit(x2)
    cold = KMeansClusterer(6, seed=0).fit(x2)
    assert warm.warm_started and not cold.warm_started
    assert warm.objective <= 1.01 * cold.objective


def test_fewer_points_than_clusters_raises():
    with pytest.raises(ValueError, match="11 clusters needs at least 11 points, got 5"):
        KMeansClusterer(11).fit(torch.randn(5, 8))


def test_non_finite_input_raises():
    x = torch.randn(50, 8)
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        KMeansClusterer(3).fit(x)


@pytest.mark.parametrize("distinct", [1, 2])
def test_duplicate_points_give_finite_centroids(distinct):
    x = torch.arange(distinct, dtype=torch.float32).repeat_interleave(40)[:, None].expand(-1, 8).clone()
    km = KMeansClusterer(5, seed=0)
    for _ in range(2):  # cold, then warm
        refresh = km.fit(x)
        assert torch.isfinite(refresh.centroids).all()
        assert refresh.empty_clusters == 5 - distinct
        assert refresh.objective == 0.0
    assert len(set(km.assign(x).tolist())) == distinct


def test_one_cluster_is_the_mean_of_every_point():
    """m = 1 works, and the centroid is the mean of all 2000 points: FAISS's default
    ``max_points_per_centroid`` (256) would have fitted a 256-point subsample instead."""
    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(0)) + 3.0
    km = KMeansClusterer(1)
    refresh = km.fit(x)
    assert torch.allclose(refresh.centroids[0], x.mean(0), atol=1e-5)
    assert (km.assign(x) == 0).all()
    faiss_km = km._faiss_kmeans(4096, 16, warm=False)
    assert faiss_km.cp.max_points_per_centroid * km.num_clusters >= 4096


def test_assign_is_the_brute_force_argmin():
    x, _, _ = blobs(n=500, k=5, sep=1.0)
    km = KMeansClusterer(5)
    km.fit(x)
    batch = torch.randn(48, 32, generator=torch.Generator().manual_seed(3))
    expected = torch.cdist(batch.double(), km.centroids.double()).argmin(1)
    assert torch.equal(km.assign(batch), expected)
    assert km.assign(batch).dtype == torch.int64
    d = squared_distances(batch, km.centroids)
    assert torch.allclose(d, torch.cdist(batch, km.centroids) ** 2, atol=1e-3)


def test_assign_before_fit_raises():
    with pytest.raises(RuntimeError, match="before the first fit"):
        KMeansClusterer(3).assign(torch.randn(4, 8))


def test_state_dict_round_trip_continues_identically():
    x, _, _ = blobs(k=4, sep=3.0)
    a = KMeansClusterer(4, seed=5)
    a.fit(x)
    b = KMeansClusterer(4, seed=0)
    b.load_state_dict(a.state_dict())
    assert b.num_fits == 1 and b.seed == 5
    assert torch.equal(a.assign(x), b.assign(x))
    x2 = x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.fit(x2).centroids, b.fit(x2).centroids)
    with pytest.raises(ValueError, match="centroids"):
        KMeansClusterer(3).load_state_dict(a.state_dict())
    empty = KMeansClusterer(4)
    empty.load_state_dict(KMeansClusterer(4).state_dict())
    assert empty.centroids is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on a machine without CUDA")
def test_gpu_request_without_gpu_falls_back_to_cpu(caplog):
    with caplog.at_level(logging.WARNING, logger="dograph.method.clustering"):
        km = KMeansClusterer(2, use_gpu=True)
    assert km.backend == "faiss-cpu" and "runs on CPU" in caplog.text
    assert km.fit(torch.randn(20, 4)).backend == "faiss-cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_inputs_stay_on_cuda_and_assign_does_not_sync():
    x, _, _ = blobs(k=4)
    km = KMeansClusterer(4)
    refresh = km.fit(x.cuda())
    assert refresh.centroids.is_cuda
    batch = x[:48].cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = km.assign(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out.is_cuda and torch.equal(out.cpu(), km.to("cpu").assign(x[:48]))


def test_every_run_seed_is_a_valid_faiss_seed() -> None:
    # run seeds are accepted up to 2**32 - 1; FAISS takes a C int (OverflowError from 2**31 on)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    clusterer = KMeansClusterer(3, seed=2**32 - 1)
    clusterer.fit(x)
    clusterer.fit(x)
    assert clusterer.num_fits == 2
