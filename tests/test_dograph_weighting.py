"""DoGraph's weighting step: the solve over present clusters, the descent guarantee, and its guards."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import numpy as np
import pytest
import torch

import dograph.method.mixer as dograph_mixer
from dograph.distributed import DistContext
from dograph.errors import ConfigError
from dograph.method.mixer import DoGraphMixer, per_sample_weights
from dograph.method.objectives import ObjectiveResult, UncertaintyObjective, VarianceObjective
from dograph.method.objectives.base import ObjectiveInputs
from dograph.mixing import StepSignals
from dograph.step.projection import KroneckerProjector
from dograph.step.timing import StepTimer


def make_mixer(m: int = 4, objective=UncertaintyObjective, buffer_size: int = 12, **kwargs) -> DoGraphMixer:
    obj_kwargs = kwargs.pop("objective_kwargs", {})
    return DoGraphMixer(num_clusters=m, objective=functools.partial(objective, **obj_kwargs),
                        projection=KroneckerProjector(seed=0), buffer_size=buffer_size, domains=["a", "b"], **kwargs)


def host_for(sizes: list[int], *, variances=None, means=None, batch_means=None, dim: int = 3):
    """A host snapshot as ``DoGraphMixer._to_host`` makes it, with every sample at its cluster's batch mean."""
    m = len(sizes)
    sizes = np.asarray(sizes, dtype=np.int64)
    assign = np.repeat(np.arange(m), sizes)
    batch_means = np.ones((m, dim)) if batch_means is None else np.asarray(batch_means, dtype=np.float64)
    host = {"finite": True, "counts": sizes.astype(np.float64), "sizes": sizes,
            "variances": np.ones(m) if variances is None else np.asarray(variances, np.float64),
            "variance_known": np.ones(m, dtype=bool), "losses": np.full(m, 3.0),
            "means": batch_means if means is None else np.asarray(means, np.float64),
            "batch_means": batch_means, "mean_grad": sizes @ batch_means / sizes.sum(),
            "adjacency": np.zeros((m, m)), "assign": assign, "domain": np.zeros_like(assign)}
    return host, torch.as_tensor(assign)


def solve(mixer: DoGraphMixer, host: dict, assign: torch.Tensor):
    return mixer._solve(7, assign, host, StepTimer(torch.device("cpu")), {})


def test_absent_cluster_does_not_take_the_weight() -> None:
    """The issue's example: s2 = [0.01 (absent), 1, 2, 4] gives the present ones 1/s2, not 1/3 each."""
    mixer = make_mixer(objective_kwargs={"graph_weight": 0.0, "proximal_weight": 0.0})
    host, assign = host_for([0, 2, 2, 2], variances=[0.01, 1.0, 2.0, 4.0])
    v, _, metrics = solve(mixer, host, assign)
    np.testing.assert_allclose(metrics["mixer/weights"], [0.0, 4 / 7, 2 / 7, 1 / 7], atol=1e-5)
    np.testing.assert_allclose(v.numpy(), np.repeat([4 / 7, 2 / 7, 1 / 7], 2) / 2, atol=1e-5)
    assert metrics["mixer/present_clusters"] == 3.0


def test_floor_counts_the_present_clusters() -> None:
    mixer = make_mixer(m=5, objective_kwargs={"graph_weight": 0.0, "proximal_weight": 0.0, "floor": 0.5})
    host, assign = host_for([0, 0, 3, 3, 0], variances=[1.0, 1.0, 1.0, 100.0, 1.0])
    _, _, metrics = solve(mixer, host, assign)
    w = np.asarray(metrics["mixer/weights"])
    assert w[[0, 1, 4]].sum() == 0.0 and w[3] == pytest.approx(0.5 / 2, abs=1e-5)  # floor 0.5 / 2 present


def test_variance_constraint_protects_the_applied_update() -> None:
    """Absent cluster aligned with mu_bar, present clusters mostly opposed: the update must still descend."""
    batch = np.array([[9.0, 9.0, 0.0], [3.0, 0.0, 0.0], [-1.0, 2.0, 0.0], [-1.0, -2.0, 0.0]])
    ema = batch.copy()
    ema[0] = [1.0, 0.0, 0.0]  # stale statistics of the absent cluster, aligned with mu_bar
    ema[1] = [30.0, 0.0, 0.0]  # a large EMA norm: the objective alone would give cluster 1 little weight
    mixer = make_mixer(objective=VarianceObjective)
    host, assign = host_for([0, 1, 1, 1], means=ema, batch_means=batch)
    v, _, _ = solve(mixer, host, assign)
    g = torch.as_tensor(batch[host["assign"]])
    update = (v.double() @ g).numpy()
    assert update @ host["mean_grad"] >= 0.0


def opposed_batch(seed: int, m: int = 6, dim: int = 5):
    """A batch whose descent rests on one present cluster with a large EMA norm; absent ones look helpful.

    The objective alone shrinks that cluster's weight, so the applied update turns uphill unless
    the descent constraint is built from the present clusters' batch means (docs/design.md section 2.5).
    """
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 4, m)
    sizes[rng.choice(m, 2, replace=False)] = 0
    lead = np.flatnonzero(sizes)[0]
    e = rng.normal(size=dim)
    e /= np.linalg.norm(e)
    batch = rng.normal(size=(m, dim))
    batch -= np.outer(batch @ e, e)
    batch -= np.outer(rng.uniform(0.5, 2.0, m), e)  # every cluster opposed to e...
    batch[lead] += e * rng.uniform(8.0, 15.0) * sizes.sum() / sizes[lead]  # ...but one carries the descent
    counts = sizes.astype(np.float64)
    mean_grad = counts @ batch / counts.sum()
    ema = batch + rng.normal(size=(m, dim)) * 0.5
    ema[lead] *= rng.uniform(3.0, 10.0)
    ema[sizes == 0] = mean_grad * rng.uniform(1.0, 5.0)
    inputs = ObjectiveInputs(counts=np.maximum(counts, 1.0), means=ema, variances=np.ones(m), losses=np.ones(m),
                             adjacency=np.zeros((m, m)), mean_grad=mean_grad, active=sizes > 0,
                             batch_means=batch, batch_counts=counts)
    return inputs, sizes, rng


def assert_descent(w: np.ndarray, inputs: ObjectiveInputs, sizes: np.ndarray, rng: np.random.Generator) -> None:
    """The update sum_i v_i g_i of per-sample gradients around the batch means has <u, mean g> >= 0."""
    m, dim = inputs.batch_means.shape
    assign = np.repeat(np.arange(m), sizes)
    noise = rng.normal(size=(len(assign), dim))
    for k in np.flatnonzero(sizes):  # per-sample gradients whose cluster means are exactly the batch means
        noise[assign == k] -= noise[assign == k].mean(0)
    g = inputs.batch_means[assign] + noise
    v = per_sample_weights(torch.as_tensor(w), torch.as_tensor(assign), m).numpy()
    assert np.isclose(v.sum(), 1.0) and np.all(w[sizes == 0] == 0.0)
    u, mean = v @ g, g.mean(0)
    assert u @ mean >= -1e-9 * np.linalg.norm(u) * np.linalg.norm(mean)


@pytest.mark.parametrize("seed", range(40))
def test_variance_update_is_a_descent_direction_on_random_batches(seed: int) -> None:
    inputs, sizes, rng = opposed_batch(seed)
    floor = float(rng.choice([0.0, 0.1, 0.5, 0.9]))
    w = VarianceObjective(num_clusters=len(sizes), floor=floor).solve(inputs, np.full(len(sizes), 1 / 6)).weights
    assert_descent(w, inputs, sizes, rng)


@pytest.mark.parametrize("seed", range(10))
def test_variance_fallback_is_repaired_into_a_descent_direction(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import cvxpy as cp

    inputs, sizes, rng = opposed_batch(seed)
    objective = VarianceObjective(num_clusters=len(sizes))

    def broken(*args: object, **kwargs: object) -> None:
        raise cp.error.SolverError("numerical trouble")

    monkeypatch.setattr(objective.problem, "solve", broken)
    result = objective.solve(inputs, np.full(len(sizes), 1 / 6))
    assert result.fallback
    assert_descent(result.weights, inputs, sizes, rng)


def test_per_sample_weights_fall_back_to_the_plain_mean_without_present_mass() -> None:
    v = per_sample_weights(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1, 1, 2, 2]), 3)
    assert torch.equal(v, torch.full((4,), 0.25))
    nan = per_sample_weights(torch.tensor([float("nan"), 0.5, 0.5]), torch.tensor([0, 1, 2]), 3)
    assert torch.equal(nan, torch.full((3,), 1 / 3))


def test_non_finite_cluster_weights_use_the_plain_mean_and_warn(monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    mixer = make_mixer()
    bad = ObjectiveResult(np.array([0.25, np.nan, 0.25, 0.5]), 0.0, False, 0.0)
    monkeypatch.setattr(mixer.objective, "solve", lambda *a, **k: bad)
    host, assign = host_for([1, 1, 1, 1])
    with caplog.at_level(logging.WARNING):
        v, decision, metrics = solve(mixer, host, assign)
    assert v is None and decision == dograph_mixer._PLAIN and metrics["mixer/plain_mean_fallback"] == 1.0
    assert "step 7" in caplog.text and "plain mean" in caplog.text


def blobs(step: int, b: int = 6, dim: int = 8) -> StepSignals:
    generator = torch.Generator().manual_seed(step)
    group = torch.arange(b) % 3
    g = torch.eye(dim)[:3][group] * 10 + 0.05 * torch.randn(b, dim, generator=generator)
    return StepSignals(step=step, input_ids=torch.zeros(b, 4, dtype=torch.long), loss=1.0 + group.float(),
                       domain=(group > 0).long(), grad_proj=g)


def test_consecutive_solver_fallbacks_are_reported_loudly(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    import cvxpy as cp

    mixer = make_mixer(m=3, max_consecutive_fallbacks=3)

    def broken(*args: object, **kwargs: object) -> None:
        raise cp.error.SolverError("numerical trouble")

    monkeypatch.setattr(mixer.objective.problem, "solve", broken)
    with caplog.at_level(logging.WARNING):
        for step in range(6):
            mixer.weigh(blobs(step))
    loud = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(loud) == 1 and "3 steps in a row" in loud[0].getMessage()
    assert mixer.fallbacks == {"streak": 4, "longest": 4, "total": 4}
    assert any(title.startswith("WARNING: solver fallbacks") for title in mixer.summary())


def test_resume_refuses_other_mixer_settings() -> None:
    trained = make_mixer(m=3)
    for step in range(3):
        trained.weigh(blobs(step))
    state = trained.state_dict()
    with pytest.raises(ConfigError, match=r"mixer\.cluster_on='direction' in the checkpoint, 'raw' now"):
        make_mixer(m=3, cluster_on="raw").load_state_dict(state)
    with pytest.raises(ConfigError, match=r"mixer\.ema_beta=0\.9 in the checkpoint, 0\.5 now"):
        make_mixer(m=3, ema_beta=0.5).load_state_dict(state)
    other = DoGraphMixer(num_clusters=3, objective=functools.partial(UncertaintyObjective), buffer_size=12,
                         projection=KroneckerProjector(seed=0, rank=8, exclude=[]))
    with pytest.raises(ConfigError, match=r"projection\.rank=16 in the checkpoint, 8 now.*projection\.exclude"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match=r"mixer\.m=3 in the checkpoint, 4 now"):
        make_mixer(m=4).load_state_dict(state)
    make_mixer(m=3).load_state_dict(state)  # the same settings resume


def refresh_with(monkeypatch: pytest.MonkeyPatch, mixer: DoGraphMixer, wrap) -> dict:
    """Train 4 steps, then run step 4 as a refresh whose ``clusterer.fit`` is ``wrap(real_fit, x)``."""
    for step in range(4):
        mixer.weigh(blobs(step))
    real_fit = mixer.clusterer.fit
    monkeypatch.setattr(mixer.clusterer, "fit", lambda x: wrap(real_fit, x))
    mixer.last_refresh_step = -10  # a refresh is due at the next step
    metrics = mixer.weigh(blobs(4)).metrics
    assert "mixer/refresh/step" in metrics
    return metrics


def test_reseeded_cluster_starts_its_statistics_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    mixer = make_mixer(m=3)
    refresh_with(monkeypatch, mixer, lambda fit, x: dataclasses.replace(fit(x), reseeded=(0,)))
    stats = mixer.stats
    assert torch.equal(stats.means[0], stats.batch_means[0])  # first sight: the batch's own mean
    assert not torch.equal(stats.means[1], stats.batch_means[1])  # an EMA blend for the others


def vanishing_blobs(step: int, b: int = 6, dim: int = 8) -> StepSignals:
    """``blobs`` after region e2 left: e0 split into two modes (e0 +- 0.3 e3), e1 unchanged."""
    signals = blobs(step, b, dim)
    group = torch.arange(b) % 3
    modes = torch.stack([torch.eye(dim)[0] + 0.3 * torch.eye(dim)[3], torch.eye(dim)[0] - 0.3 * torch.eye(dim)[3],
                         torch.eye(dim)[1]])
    noise = 0.05 * torch.randn(b, dim, generator=torch.Generator().manual_seed(100 + step))
    return dataclasses.replace(signals, grad_proj=modes[group] * 10 + noise)


def test_vanished_region_resets_its_statistics_and_w_last(monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15: the region of one cluster leaves the buffer; FAISS splits another cluster
    into its id. At the refresh the id starts afresh: statistics of first sight and the
    mean of the other ids' ``w_last`` (not its old 0.8) as its proximal anchor."""
    mixer = make_mixer(m=3, recluster_every=2)  # fits at steps 1, 3, 5 (buffer: the last two batches)
    for step in range(4):
        mixer.weigh(blobs(step))
    gone = int(mixer.clusterer.assign(torch.eye(8)[2:3])[0])  # the id of region e2
    assert bool(mixer.stats.active[gone])
    mixer.weigh(vanishing_blobs(4))
    mixer.w_last = np.where(np.arange(3) == gone, 0.8, 0.1)
    seen = {}
    real_solve = mixer.objective.solve

    def spy(inputs, w_prev, **kwargs):
        seen.update(w_last=mixer.w_last.copy(), counts=mixer.stats.counts.clone(),
                    batch_counts=mixer.stats.batch_counts.clone(), means=mixer.stats.means.clone(),
                    batch_means=mixer.stats.batch_means.clone())
        return real_solve(inputs, w_prev, **kwargs)

    monkeypatch.setattr(mixer.objective, "solve", spy)
    mixer.weigh(vanishing_blobs(5))
    refresh = mixer.history.refreshes[-1]
    assert refresh["step"] == 5 and refresh["empty_clusters"] == 0  # FAISS left nothing empty
    assert refresh["vanished"] == [gone] and refresh["reseeded"] == [gone]
    assert seen["w_last"][gone] == pytest.approx(0.1)  # the mean of the kept ids' w_last
    assert seen["counts"][gone] == seen["batch_counts"][gone]  # no decayed old count: first sight or absent
    if seen["batch_counts"][gone] > 0:
        assert torch.equal(seen["means"][gone], seen["batch_means"][gone])


def test_cluster_time_excludes_the_kmeans_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    def slow_fit(fit, x: torch.Tensor):
        time.sleep(0.3)
        return fit(x)

    metrics = refresh_with(monkeypatch, make_mixer(m=3), slow_fit)
    assert float(metrics["mixer/time_cluster_s"]) < 0.1  # the slow refresh ran in this step, but not in this time


class HostCopies:
    """Counts the calls that copy a device value to the host."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in ("item", "cpu", "tolist"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(original))

    def _counting(self, original):
        def wrapper(tensor, *args, **kwargs):
            self.count += 1
            return original(tensor, *args, **kwargs)

        return wrapper


@pytest.mark.parametrize("rank", [0, 1])
def test_one_host_synchronisation_per_rank_and_step(monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    """Under DDP each rank copies to the host once per (non-refresh) step: rank 0 its statistics, others the flag."""
    leader = make_mixer(m=3, buffer_size=24)  # rank 0's state, also used to answer rank 1's broadcast
    for step in range(6):
        leader.weigh(blobs(step, b=12))
    assert leader.clusterer.centroids is not None
    mixer = leader if rank == 0 else make_mixer(m=3, buffer_size=24)
    mixer.dist = DistContext(rank=rank, world_size=2)
    half = blobs(6, b=12)
    local = StepSignals(step=6, input_ids=half.input_ids[:6], loss=half.loss[:6], domain=half.domain[:6],
                        grad_proj=half.grad_proj[:6])
    monkeypatch.setattr(dograph_mixer, "all_gather_cat", lambda dist, t: torch.cat([t, t]))
    monkeypatch.setattr(dograph_mixer, "broadcast", lambda dist, t: torch.cat([torch.full((12,), 1 / 12),
                                                                               torch.zeros(1)]))
    copies = HostCopies(monkeypatch)
    out = mixer.weigh(local)
    assert "mixer/refresh/step" not in out.metrics and out.sample_weights is not None
    assert copies.count == 1


# ---- mixer.sample_weights: the paper's update and our variants (issue 19; docs/design.md section 2.5) ----------
def _rule_case() -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    w = torch.tensor([0.5, 0.0, 0.2, 0.3])  # cluster 1 absent
    assign = torch.tensor([0, 2, 2, 3, 0, 3, 3, 2, 2])
    counts = np.bincount(assign.numpy(), minlength=4)
    return w, assign, w.numpy().astype(np.float64), counts


def test_cluster_mean_is_the_papers_update() -> None:
    w, assign, wn, counts = _rule_case()
    v = per_sample_weights(w, assign, 4, "cluster_mean").numpy()
    a = assign.numpy()
    np.testing.assert_allclose(v, wn[a] / (counts[a] * wn[counts > 0].sum()), rtol=1e-6)
    g = np.random.default_rng(0).normal(size=(len(a), 5))  # sum_i v_i g_i == sum_k w_k gbar_k
    gbar = np.stack([g[a == k].mean(0) if counts[k] else np.zeros(5) for k in range(4)])
    np.testing.assert_allclose(v @ g, wn @ gbar / wn[counts > 0].sum(), rtol=1e-5)
    assert torch.equal(per_sample_weights(w, assign, 4), per_sample_weights(w, assign, 4, "cluster_mean"))


def test_tilt_is_a_per_sample_multiplier() -> None:
    w, assign, wn, _ = _rule_case()
    v = per_sample_weights(w, assign, 4, "tilt").numpy()
    a = assign.numpy()
    np.testing.assert_allclose(v, wn[a] / wn[a].sum(), rtol=1e-6)
    # v_i / v_j = w_c(i) / w_c(j) whatever the cluster sizes (cluster 0: 2 samples, cluster 2: 4)
    assert v[0] / v[1] == pytest.approx(0.5 / 0.2, rel=1e-6)


@pytest.mark.parametrize("sizes", [[1, 7, 3], [5, 5, 1], [16, 1, 1]])
def test_tilt_with_equal_weights_is_exactly_the_plain_mean(sizes: list[int]) -> None:
    assign = torch.as_tensor(np.repeat(np.arange(3), sizes))
    for weight in (1 / 3, 0.25, 7.0):
        v = per_sample_weights(torch.full((3,), weight), assign, 3, "tilt")
        assert torch.equal(v, torch.full((len(assign),), 1.0 / len(assign)))
    # an absent cluster's weight does not matter (it is 0 once solved; any value here)
    v = per_sample_weights(torch.tensor([0.3, 0.3, 0.3, 0.9]), assign, 4, "tilt")
    assert torch.equal(v, torch.full((len(assign),), 1.0 / len(assign)))


def test_shrink_blends_the_plain_mean_and_the_papers_update() -> None:
    w, assign, _, _ = _rule_case()
    paper = per_sample_weights(w, assign, 4, "cluster_mean")
    plain = torch.full_like(paper, 1 / len(assign))
    for alpha in (0.0, 0.25, 0.5, 1.0):
        v = per_sample_weights(w, assign, 4, "shrink", alpha)
        torch.testing.assert_close(v, alpha * plain + (1 - alpha) * paper)
        assert float(v.sum()) == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(per_sample_weights(w, assign, 4, "shrink", 0.0), paper)


@pytest.mark.parametrize("rule", ["tilt", "shrink"])
def test_variants_fall_back_to_the_plain_mean_without_present_mass(rule: str) -> None:
    v = per_sample_weights(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1, 1, 2, 2]), 3, rule, 0.5)
    assert torch.equal(v, torch.full((4,), 0.25))
    nan = per_sample_weights(torch.tensor([float("nan"), 0.5, 0.5]), torch.tensor([0, 1, 2]), 3, rule, 0.5)
    assert torch.equal(nan, torch.full((3,), 1 / 3))


@pytest.mark.parametrize("rule", ["tilt", "shrink"])
def test_the_mixer_applies_its_sample_weight_rule(rule: str) -> None:
    mixer = make_mixer(objective_kwargs={"graph_weight": 0.0, "proximal_weight": 0.0}, sample_weights=rule,
                       shrink=0.5 if rule == "shrink" else None)
    host, assign = host_for([0, 1, 2, 4], variances=[0.01, 1.0, 2.0, 4.0])
    v, _, metrics = solve(mixer, host, assign)
    w = torch.as_tensor(metrics["mixer/weights"], dtype=torch.float32)
    torch.testing.assert_close(v, per_sample_weights(w, assign, 4, rule, 0.5))
    assert not torch.allclose(v, per_sample_weights(w, assign, 4, "cluster_mean"))


def test_an_unknown_sample_weight_rule_stops_the_mixer_before_any_step():
    with pytest.raises(ConfigError, match=r"mixer\.sample_weights must be one of cluster_mean, tilt, shrink"):
        make_mixer(sample_weights="tilted")
