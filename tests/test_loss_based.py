"""Loss-based sample reweighting (Sow et al., 2025): formulas, burn-in, rank slices, config, state, full runs."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

import baselines.loss_based as loss_based
from baselines.loss_based import LossBasedMixer, loss_based_weights, normalised_losses
from dograph.distributed import DistContext
from dograph.errors import ConfigError
from dograph.mixing import StepSignals
from dograph.runs.app import run_training
from dograph.train.metrics import read_metrics

STRATEGIES = ["mid", "upper", "linupper", "extremes"]


def signals(step: int, loss: list[float], domain: list[int]) -> StepSignals:
    return StepSignals(step=step, input_ids=torch.zeros(len(loss), 4, dtype=torch.long),
                       loss=torch.tensor(loss), domain=torch.tensor(domain))


def softmax(f: list[float], kl_reg: float) -> list[float]:
    g = [math.exp((x - max(f)) / kl_reg) for x in f]
    return [x / sum(g) for x in g]


# losses 1, 2, 3, 5: l_min 1, l_max 5, so h = (2 l - 6) / 4 = -1, -0.5, 0, 1 (delta = 1)
LOSSES = [1.0, 2.0, 3.0, 5.0]
HAND_F = {
    "mid": [0.0, 0.75, 1.0, 0.0],  # 1 - h^2
    "upper": [0.0, 0.25, 0.5, 1.0],  # 0.5 h + 0.5
    "linupper": [0.0, 0.5, 1.0, 1.0],  # min(h + 1, 1)
    "extremes": [1.0, 0.5, 0.0, 1.0],  # |h|
}


def test_normalised_losses_span_minus_delta_to_delta() -> None:
    h = normalised_losses(torch.tensor(LOSSES))
    assert torch.allclose(h, torch.tensor([-1.0, -0.5, 0.0, 1.0]))
    h2 = normalised_losses(torch.tensor(LOSSES), delta=2.0)
    assert torch.allclose(h2, torch.tensor([-2.0, -1.0, 0.0, 2.0]))


@pytest.mark.parametrize("kl_reg", [1.0, 0.4])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_weights_match_the_hand_computed_formula(strategy: str, kl_reg: float) -> None:
    v = loss_based_weights(torch.tensor(LOSSES), strategy, kl_reg)
    expected = torch.tensor(softmax(HAND_F[strategy], kl_reg))
    assert torch.allclose(v, expected, atol=1e-6)
    assert torch.isclose(v.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_with_delta_two(strategy: str) -> None:
    """With delta = 2, h doubles and each f follows its delta-scaled formula."""
    h = [-2.0, -1.0, 0.0, 2.0]
    f = {"mid": [1 - x * x / 4 for x in h], "upper": [0.5 * x + 1.0 for x in h],
         "linupper": [min(x + 2.0, 2.0) for x in h], "extremes": [abs(x) for x in h]}[strategy]
    v = loss_based_weights(torch.tensor(LOSSES), strategy, 1.0, delta=2.0)
    assert torch.allclose(v, torch.tensor(softmax(f, 1.0)), atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("value", [0.0, 3.7, 1e4])
def test_equal_losses_give_uniform_weights(strategy: str, value: float) -> None:
    v = loss_based_weights(torch.full((6,), value), strategy, 0.4)
    assert torch.equal(v, torch.full((6,), 1 / 6))


def test_nearly_equal_losses_stay_finite() -> None:
    loss = torch.tensor([2.0, 2.0 + 1e-7, 2.0 - 1e-7])
    for strategy in STRATEGIES:
        v = loss_based_weights(loss, strategy, 0.4)
        assert torch.isfinite(v).all() and torch.isclose(v.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_weights_favour_what_each_strategy_names(strategy: str) -> None:
    loss = torch.sort(torch.rand(33, generator=torch.Generator().manual_seed(0)) * 4 + 1).values
    v = loss_based_weights(loss, strategy, 0.5)
    assert torch.isclose(v.sum(), torch.tensor(1.0)) and (v > 0).all()
    diffs = v[1:] - v[:-1]
    middle = int(torch.argmin((loss - (loss.min() + loss.max()) / 2).abs()))
    if strategy == "upper":  # strictly increasing in the loss
        assert (diffs > 0).all()
    elif strategy == "linupper":  # increasing up to the midpoint, flat (and maximal) above it
        assert (diffs >= -1e-7).all() and v[-1] == v.max() and v[0] == v.min()
        assert torch.allclose(v[loss >= (loss.min() + loss.max()) / 2], v.max())
    elif strategy == "mid":  # the middle loss weighs most, the ends least
        assert int(torch.argmax(v)) == middle and {int(torch.argmin(v))} <= {0, len(v) - 1}
    else:  # extremes: the ends weigh most, the middle least
        assert int(torch.argmin(v)) == middle and int(torch.argmax(v)) in (0, len(v) - 1)
        assert torch.isclose(v[0], v[-1])


def test_smaller_kl_reg_concentrates_the_weights() -> None:
    loss = torch.tensor([1.0, 1.5, 2.0, 4.0, 6.0])
    sharp, flat = (loss_based_weights(loss, "upper", k) for k in (0.1, 10.0))
    assert (sharp * sharp).sum() > (flat * flat).sum() and sharp.argmax() == 4
    assert torch.allclose(flat, torch.full((5,), 0.2), atol=0.03)


def test_burn_in_is_the_plain_mean_then_reweights() -> None:
    mixer = LossBasedMixer(strategy="upper", kl_reg=1.0, burn_in=2, domains=["a", "b"])
    for step in (0, 1):
        out = mixer.weigh(signals(step, LOSSES, [0, 0, 1, 1]))
        assert out.sample_weights is None and out.metrics["mixer/burn_in"] == 1.0
        assert float(out.metrics["mixer/weights/a"]) == pytest.approx(0.5)  # the plain mean's mass
    out = mixer.weigh(signals(2, LOSSES, [0, 0, 1, 1]))
    expected = softmax(HAND_F["upper"], 1.0)
    assert out.metrics["mixer/burn_in"] == 0.0
    assert torch.allclose(out.sample_weights, torch.tensor(expected), atol=1e-6)
    assert float(out.metrics["mixer/weights/a"]) == pytest.approx(expected[0] + expected[1], abs=1e-6)
    assert float(out.metrics["mixer/weights/b"]) == pytest.approx(expected[2] + expected[3], abs=1e-6)
    assert float(out.metrics["mixer/loss_range"]) == pytest.approx(4.0)


def test_zero_burn_in_reweights_from_the_first_step() -> None:
    out = LossBasedMixer(burn_in=0, domains=["a"]).weigh(signals(0, LOSSES, [0, 0, 0, 0]))
    assert out.sample_weights is not None


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_takes_its_rows_by_global_rank(monkeypatch: pytest.MonkeyPatch, rank: int) -> None:
    """A fake 2-rank world: the gather returns the whole batch; rank r applies rows [r b, (r + 1) b)."""
    losses = [1.0, 2.0, 3.0, 5.0, 4.0, 1.5]
    domains = [0, 1, 1, 0, 1, 0]
    full = torch.stack([torch.tensor(losses), torch.tensor(domains, dtype=torch.float)], dim=1)
    seen = []

    def fake_gather(ctx: DistContext, tensor: torch.Tensor) -> torch.Tensor:
        seen.append(tensor.clone())
        return full.clone()

    monkeypatch.setattr(loss_based, "all_gather_cat", fake_gather)
    # rank 1 of a 2-node job with one process per node: local rank 0, global rank 1
    ctx = DistContext(rank=rank, world_size=2, local_rank=0)
    mixer = LossBasedMixer(strategy="extremes", kl_reg=0.4, burn_in=0, domains=["a", "b"], dist=ctx)
    mine = slice(3 * rank, 3 * rank + 3)
    out = mixer.weigh(signals(0, losses[mine], domains[mine]))
    assert torch.equal(seen[0][:, 0], torch.tensor(losses[mine]))  # this rank sent its own losses
    whole = loss_based_weights(torch.tensor(losses), "extremes", 0.4)
    assert torch.equal(out.sample_weights, whole[mine])
    if rank == 0:  # rank 0 logs the mass per domain of the whole global batch
        assert float(out.metrics["mixer/weights/a"]) == pytest.approx(float(whole[[0, 3, 5]].sum()), abs=1e-6)
    else:  # other ranks neither log nor keep a history
        assert out.metrics == {} and mixer.state_dict()["history"]["steps"] == []


def _run(mixer: LossBasedMixer, steps: range) -> list[torch.Tensor | None]:
    out = []
    for step in steps:
        g = torch.Generator().manual_seed(step)
        loss = (torch.rand(6, generator=g) * 3 + 1).tolist()
        domain = torch.randint(0, 3, (6,), generator=g).tolist()
        out.append(mixer.weigh(signals(step, loss, domain)).sample_weights)
    return out


def test_state_dict_round_trip_and_weights_csv(tmp_path: Path) -> None:
    domains = ["a", "b", "c"]
    a = LossBasedMixer(strategy="mid", kl_reg=0.4, burn_in=2, domains=domains)
    _run(a, range(5))
    state = a.state_dict()
    assert state["history"]["steps"] == [0, 1, 2, 3, 4]
    b = LossBasedMixer(strategy="mid", kl_reg=0.4, burn_in=2, domains=domains)
    b.load_state_dict(state)
    for wa, wb in zip(_run(a, range(5, 8)), _run(b, range(5, 8)), strict=True):
        assert torch.equal(wa, wb)
    a.save_artifacts(tmp_path / "a")
    b.save_artifacts(tmp_path / "b")
    text = (tmp_path / "a" / "weights.csv").read_text()
    assert text == (tmp_path / "b" / "weights.csv").read_text()
    rows = list(csv.reader(text.splitlines()))
    assert rows[0] == ["step", "a", "b", "c", "reweighted", "loss_min", "loss_max"]
    assert [int(r[0]) for r in rows[1:]] == list(range(8))
    assert [float(r[4]) for r in rows[1:]] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert all(sum(float(x) for x in r[1:4]) == pytest.approx(1.0) for r in rows[1:])
    assert all(float(r[5]) <= float(r[6]) for r in rows[1:])
    assert next(iter(a.summary().values())).startswith("6 reweighted steps")  # steps 2-7


def test_resume_refuses_other_domains() -> None:
    a = LossBasedMixer(domains=["a", "b"])
    with pytest.raises(ConfigError, match="domains"):
        LossBasedMixer(domains=["a", "c"]).load_state_dict(a.state_dict())


def test_summary_during_burn_in() -> None:
    mixer = LossBasedMixer(burn_in=10, domains=["a", "b", "c"])
    _run(mixer, range(2))
    assert "still in burn-in" in next(iter(mixer.summary().values()))


# ---- full runs -------------------------------------------------------------------------------
LOSS_BASED_RUN = ("mixer=loss_based", "mixer.burn_in=2", "mixer.strategy=extremes", "mixer.kl_reg=0.4",
                  "trainer.batch_size=4")


def deterministic_train_records(run_dir: Path) -> list[dict]:
    clock = ("time", "tokens_per_s")
    return [{k: v for k, v in r.items() if k not in clock} for r in read_metrics(run_dir) if r["kind"] == "train"]


def test_tiny_model_defaults_compose(make_config) -> None:
    cfg = make_config("mixer=loss_based")
    assert cfg.mixer["strategy"] == "mid" and cfg.mixer["kl_reg"] == 1.0 and cfg.mixer["burn_in"] == 20
    assert make_config(*LOSS_BASED_RUN).mixer["burn_in"] == 2  # the command line wins over model_mixer


def test_loss_based_run_logs_saves_and_resumes_exactly(make_config, tmp_path: Path) -> None:
    """Resumed mid log window (step 6 of windows of 4): every logged value is bit-identical."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run = (*LOSS_BASED_RUN, "trainer.max_steps=12", "trainer.log_every=4")
    done = run_training(make_config(*run), straight)
    first = run_training(make_config(*run, "trainer.stop_after_steps=6"), resumed)
    assert first.stopped_early
    again = run_training(make_config(*run, "resume=true"), resumed)
    expected = deterministic_train_records(straight)
    assert [r["step"] for r in expected] == [4, 8, 12]
    domains = ("code", "docs", "licences")
    for record in expected:
        assert all(f"mixer/weights/{d}" in record for d in domains) and "train/ess" in record
        assert sum(record[f"mixer/weights/{d}"] for d in domains) == pytest.approx(1.0, abs=1e-5)
    assert expected[-1]["mixer/burn_in"] == 0.0 and 0 < expected[-1]["train/ess"] <= 1 + 1e-6
    assert deterministic_train_records(resumed) == expected
    assert again.weight_summary == done.weight_summary and done.weight_summary.steps == 10
    text = (straight / "mixer" / "weights.csv").read_text()
    assert text == (resumed / "mixer" / "weights.csv").read_text()
    rows = list(csv.reader(text.splitlines()))
    assert rows[0] == ["step", *domains, "reweighted", "loss_min", "loss_max"] and len(rows) == 13


def test_history_moves_to_the_host_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loss_based, "MAX_PENDING", 3)
    mixer = LossBasedMixer(burn_in=1, domains=["a", "b", "c"])
    _run(mixer, range(5))
    assert mixer.history.steps == [0, 1, 2] and len(mixer._pending_rows) == 2
    assert mixer.state_dict()["history"]["steps"] == [0, 1, 2, 3, 4] and not mixer._pending_rows
